"""Delta codecs: round trips with their error bounds, error feedback, size, and every rejection."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from tandem import compression
from tandem.compression import (
    INT8_BLOCK,
    Codec,
    CompressionError,
    ErrorFeedback,
    component_limits,
    decode,
    encode,
    kept,
    parse_codec,
)

CODECS = ["none", "fp16", "int8", "topk:0.01", "topk:0.01+int8", "topk:0.3", "topk:1.0+int8"]
SHAPES = [(), (1,), (7,), (3, 5), (64, 129), (INT8_BLOCK * 2 + 17,)]


def _random(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05


def _check_limits(name: str, shape: tuple[int, ...], codec: Codec, parts: dict[str, np.ndarray]) -> None:
    limits = component_limits(name, shape, codec)
    assert set(parts) == set(limits)
    for key, (dtype, length, exact) in limits.items():
        part = parts[key]
        assert part.ndim == 1 and part.flags.c_contiguous and part.dtype == dtype, key
        assert part.size == length if exact else part.size <= length, key


@pytest.mark.parametrize("text", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_bounds(text: str, shape: tuple[int, ...]) -> None:
    codec = parse_codec(text)
    x = _random(shape)
    parts = encode("layer.weight", x, codec)
    _check_limits("layer.weight", shape, codec, parts)
    y = decode("layer.weight", parts, shape, codec)
    assert y.dtype == np.float32 and y.shape == shape
    flat, got = x.reshape(-1), y.reshape(-1)
    if codec.kind == "none":
        assert np.array_equal(y, x)
    elif codec.kind == "fp16":
        np.testing.assert_allclose(got, flat, rtol=1e-3, atol=1e-7)
    elif codec.kind == "int8":
        scales = parts["layer.weight#scale"]
        for b, scale in enumerate(scales):
            block = slice(b * INT8_BLOCK, (b + 1) * INT8_BLOCK)
            assert np.abs(got[block] - flat[block]).max() <= scale / 2 * (1 + 1e-5) + 1e-12
    else:
        k = kept(codec, flat.size)
        nonzero = np.flatnonzero(got)
        assert nonzero.size <= k
        top = np.argsort(-np.abs(flat), kind="stable")[:k]  # random data: no ties
        assert set(nonzero) <= set(top)
        bound = parts["layer.weight#scale"][0] / 2 * (1 + 1e-5) if codec.int8 else np.abs(flat[top]) * 1e-3
        assert np.all(np.abs(got[top] - flat[top]) <= bound + 1e-12)
        rest = np.ones(flat.size, dtype=bool)
        rest[top] = False
        assert not got[rest].any()


def test_topk_keeps_exactly_the_largest() -> None:
    x = np.zeros(1000, dtype=np.float32)
    big = np.random.default_rng(1).choice(1000, size=10, replace=False)
    x[big] = np.linspace(1, 2, 10, dtype=np.float32) * np.where(np.arange(10) % 2, 1, -1)
    x[np.setdiff1d(np.arange(1000), big)] = np.random.default_rng(2).uniform(-0.5, 0.5, 990)
    codec = parse_codec("topk:0.01")
    assert kept(codec, 1000) == 10
    y = decode("w", encode("w", x, codec), x.shape, codec)
    assert set(np.flatnonzero(y)) == set(big)


def test_kept() -> None:
    assert kept(parse_codec("topk:0.01"), 0) == 0
    assert kept(parse_codec("topk:0.01"), 1) == 1
    assert kept(parse_codec("topk:0.01"), 150) == 2
    assert kept(parse_codec("topk:1.0"), 5) == 5
    assert kept(parse_codec("int8"), 5) == 5


@pytest.mark.parametrize("text", ["none", "fp16", "int8", "topk:0.01", "topk:0.01+int8", "topk:1.0", "topk:0.25+int8"])
def test_parse_and_str_round_trip(text: str) -> None:
    codec = parse_codec(text)
    assert str(codec) == text and parse_codec(str(codec)) == codec
    assert codec.lossless == (text == "none")


@pytest.mark.parametrize(
    "text", ["", "None", "int4", "topk", "topk:", "topk:0", "topk:1.5", "topk:-0.1", "topk:nan", "topk:inf",
             "topk:abc", "topk:0.01+fp16", "topk:0.01+int8+int8", "fp16+int8", " int8", "topk: 0.1"],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected none, fp16, int8, topk:F"):
        parse_codec(text)


def test_codec_rejects_bad_fields() -> None:
    for args in [("zip",), ("int8", 0.5), ("fp16", 1.0, True), ("topk", 0.0), ("topk", math.nan)]:
        with pytest.raises(ValueError):
            Codec(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["topk:0.05+int8", "topk:0.05", "int8", "fp16", "none"])
def test_error_feedback_conserves_the_sum(text: str) -> None:
    ef = ErrorFeedback(parse_codec(text))
    shapes = {"a": (40, 50), "b": (3,)}
    sent = {n: np.zeros(s, dtype=np.float64) for n, s in shapes.items()}
    true = {n: np.zeros(s, dtype=np.float64) for n, s in shapes.items()}
    for round_ in range(6):
        deltas = {n: _random(s, seed=round_ * 10 + i) for i, (n, s) in enumerate(shapes.items())}
        wire, decoded = ef.compress(deltas)
        for n, s in shapes.items():
            assert np.array_equal(decode(n, wire, s, ef.codec), decoded[n])
            sent[n] += decoded[n]
            true[n] += deltas[n]
    for n in shapes:
        residual = ef.residual.get(n, np.zeros(shapes[n], dtype=np.float32))
        np.testing.assert_allclose(sent[n] + residual, true[n], atol=1e-5)
    if text == "none":
        assert not ef.residual
    else:
        assert np.abs(ef.residual["a"]).max() > 0
        restored = ErrorFeedback(ef.codec)
        restored.load_state(ef.state())
        assert all(np.array_equal(restored.residual[n], ef.residual[n]) for n in ef.residual)


def test_topk_int8_is_under_one_percent_of_dense() -> None:
    x = _random((335_000,))
    parts = encode("w", x, parse_codec("topk:0.01+int8"))
    assert sum(p.nbytes for p in parts.values()) <= x.nbytes / 100


def test_encode_rejects_non_finite_input() -> None:
    for text in CODECS:
        for bad in (np.nan, np.inf):
            x = _random((100,))
            x[17] = bad
            with pytest.raises(ValueError, match="NaN or infinite"):
                encode("w", x, parse_codec(text))


def test_empty_tensor() -> None:
    for text in CODECS:
        codec = parse_codec(text)
        y = decode("w", encode("w", np.zeros((0, 4), dtype=np.float32), codec), (0, 4), codec)
        assert y.shape == (0, 4)


# ---- hostile encodings ---------------------------------------------------------

Parts = dict[str, np.ndarray]
SHAPE = (50, 40)  # 2000 elements: topk:0.01 keeps 20


def _valid(text: str) -> Parts:
    return encode("w", _random(SHAPE, seed=3), parse_codec(text))


def _set(key: str, value: np.ndarray) -> Callable[[Parts], None]:
    def edit(parts: Parts) -> None:
        parts[key] = value

    return edit


def _poke(key: str, index: int, value: float) -> Callable[[Parts], None]:
    def edit(parts: Parts) -> None:
        parts[key] = parts[key].copy()
        parts[key][index] = value

    return edit


def _indices(*idx: int) -> Callable[[Parts], None]:
    """Replace the index stream by a well-formed varint stream of the given indices."""
    def edit(parts: Parts) -> None:
        gaps = np.diff(np.array(idx), prepend=0).astype(np.uint64)
        out = []
        for g in gaps:  # a reference encoder, independent of the one under test
            g = int(g)
            while g >= 0x80:
                out.append(g & 0x7F | 0x80)
                g >>= 7
            out.append(g)
        parts["w#idx"] = np.array(out, dtype=np.uint8)

    return edit


def _drop(key: str) -> Callable[[Parts], None]:
    def edit(parts: Parts) -> None:
        del parts[key]

    return edit


def _truncate(key: str, n: int) -> Callable[[Parts], None]:
    return _set_from(key, lambda a: a[:n])


def _set_from(key: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Parts], None]:
    def edit(parts: Parts) -> None:
        parts[key] = fn(parts[key])

    return edit


SORTED_20 = list(range(0, 2000, 100))
# The largest 5-byte varint, 2**35 - 1: a gap far beyond any index of the tensor.
MAX_VARINT = np.array([0xFF] * 4 + [0x7F], np.uint8)
HOSTILE: list[tuple[str, str, Callable[[Parts], None], str]] = [
    ("missing component", "int8", _drop("w#scale"), "missing components"),
    ("missing topk scale", "topk:0.01+int8", _drop("w#scale"), "missing components"),
    ("extra component", "topk:0.01", _set("w#scale", np.ones(1, np.float32)), "unexpected"),
    ("extra dense", "int8", _set("w", np.zeros(2000, np.float32)), "unexpected"),
    ("wrong dtype none", "none", _set_from("w", lambda a: a.astype(np.float64)), "dtype"),
    ("big-endian", "none", _set_from("w", lambda a: a.astype(">f4")), "dtype"),
    ("wrong dtype q", "int8", _set_from("w#q", lambda a: a.view(np.uint8)), "dtype"),
    ("wrong dtype val", "topk:0.01+int8", _set_from("w#val", lambda a: a.astype(np.float16)), "dtype"),
    ("wrong dtype idx", "topk:0.01", _set_from("w#idx", lambda a: a.astype(np.int8)), "dtype"),
    ("not 1-D", "none", _set_from("w", lambda a: a.reshape(SHAPE)), "1-D"),
    ("not an array", "none", _set("w", [0.0] * 2000), "1-D"),  # type: ignore[arg-type]
    ("short dense", "fp16", _truncate("w", 1999), "1999 elements where 2000"),
    ("long dense", "none", _set("w", np.zeros(2001, np.float32)), "2001 elements where 2000"),
    ("short scales", "int8", _truncate("w#scale", 0), "elements where 1"),
    ("short values", "topk:0.01", _truncate("w#val", 19), "19 elements where 20"),
    ("idx over the limit", "topk:0.01", _set("w#idx", np.ones(101, np.uint8)), "exceeds the limit of 100"),
    ("truncated varint", "topk:0.01", _set_from("w#idx", lambda a: np.append(a[:-1], np.uint8(0x85))), "truncated"),
    ("over-long varint", "topk:0.01", _set("w#idx", np.array([0x80] * 5 + [1] + [1] * 19, np.uint8)), "longer than 5"),
    ("too few indices", "topk:0.01", _indices(*SORTED_20[:19]), "19 indices where 20"),
    ("too many indices", "topk:0.01", _indices(*range(21)), "21 indices where 20"),
    ("empty idx", "topk:0.01", _set("w#idx", np.zeros(0, np.uint8)), "0 indices where 20"),
    ("index out of range", "topk:0.01", _indices(*SORTED_20[:19], 2000), "out of range"),
    ("huge first index", "topk:0.01", _indices(2**34, *range(2**34 + 1, 2**34 + 20)), "out of range"),
    ("duplicate index", "topk:0.01", _indices(*SORTED_20[:10], 900, *SORTED_20[10:19]), "duplicate"),
    ("largest gaps", "topk:0.01", _set("w#idx", np.tile(MAX_VARINT, 20)), "out of range"),
    ("NaN scale", "int8", _poke("w#scale", 0, np.nan), "NaN or infinite scale"),
    ("inf scale", "topk:0.01+int8", _poke("w#scale", 0, np.inf), "NaN or infinite scale"),
    ("negative scale", "int8", _poke("w#scale", 0, -1.0), "negative scale"),
    ("negative topk scale", "topk:0.01+int8", _poke("w#scale", 0, -0.5), "negative scale"),
    ("NaN fp16 value", "topk:0.01", _poke("w#val", 3, np.nan), "NaN or infinite value"),
    ("inf fp16 value", "topk:0.01", _poke("w#val", 3, np.inf), "NaN or infinite value"),
    ("NaN dense fp16", "fp16", _poke("w", 3, np.nan), "NaN or infinite value"),
    ("inf dense float32", "none", _poke("w", 3, -np.inf), "NaN or infinite value"),
]


@pytest.mark.parametrize(("case", "text", "edit", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_encoding_rejected(case: str, text: str, edit: Callable[[Parts], None], message: str) -> None:
    parts = _valid(text)
    decode("w", parts, SHAPE, parse_codec(text))  # the unedited encoding is fine
    edit(parts)
    with pytest.raises(CompressionError, match=message):
        decode("w", parts, SHAPE, parse_codec(text))


def test_other_tensors_components_are_ignored() -> None:
    codec = parse_codec("int8")
    parts = {**encode("a", _random((10,)), codec), **encode("ab", _random((10,)), codec)}
    assert decode("a", parts, (10,), codec).shape == (10,)


def test_names_with_separator_rejected() -> None:
    with pytest.raises(ValueError, match="'#'"):
        encode("w#q", _random((3,)), parse_codec("none"))


@pytest.mark.parametrize("nonzero_fraction", [0.2, 0.03, 0.0])
def test_topk_of_a_large_sparse_tensor_keeps_its_largest_values(nonzero_fraction: float) -> None:
    """The sampled-threshold path on aggregates of sparse updates (mostly zeros)."""
    rng = np.random.default_rng(1)
    n = 5_000_000
    x = np.zeros(n, np.float32)
    support = rng.choice(n, int(n * nonzero_fraction), replace=False)
    x[support] = rng.standard_normal(support.size).astype(np.float32)
    codec = compression.parse_codec("topk:0.05")
    k = compression.kept(codec, n)
    encoded = compression.encode("w", x, codec)
    decoded = compression.decode("w", encoded, x.shape, codec)
    kept_values = np.sort(np.abs(x))[::-1][:k]
    assert np.count_nonzero(decoded) == min(k, support.size)
    np.testing.assert_allclose(np.sort(np.abs(decoded))[::-1][:k], kept_values, rtol=1e-3, atol=1e-5)  # float16


def test_scales_that_overflow_to_infinity_are_rejected() -> None:
    x = np.linspace(-1, 1, 5000, dtype=np.float32)
    for text in ("int8", "topk:0.1+int8"):
        codec = compression.parse_codec(text)
        parts = compression.encode("w", x, codec)
        parts["w#scale"] = np.full_like(parts["w#scale"], 3e38)
        with pytest.raises(compression.CompressionError, match="overflow"):
            compression.decode("w", parts, x.shape, codec)
        with pytest.raises(compression.CompressionError, match="overflow"):
            compression.validate("w", parts, x.shape, codec)


def test_topk_refuses_to_encode_nan_on_the_sampled_path() -> None:
    x = np.random.default_rng(0).standard_normal(5_000_000).astype(np.float32)
    x[123] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compression.encode("w", x, compression.parse_codec("topk:0.01"))
