"""Tensors on the wire: chunked and whole round trips, the content hash, and every rejection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from cloud.tensorfile import read_tensors
from tandem import wire
from tandem.v1 import tensor_pb2

SUPPORTED = ["<f4", "<f2", "i1", "u1", "<i4", "<i8"]


def _random(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def _round_trip(arrays: Mapping[str, np.ndarray], chunk_bytes: int = wire.CHUNK_BYTES) -> dict[str, np.ndarray]:
    assembler = wire.ChunkAssembler(wire.specs_of(arrays))
    for chunk in wire.iter_chunks(arrays, chunk_bytes=chunk_bytes):
        assembler.add(chunk)
    assert assembler.bytes_received == sum(a.nbytes for a in arrays.values())
    return assembler.result()


def _assert_same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(array).tobytes(), name


def _chunk(name: str = "w", dtype: int = tensor_pb2.DTYPE_FLOAT32, shape: tuple[int, ...] = (4,),
           offset: int = 0, data: bytes = b"\0" * 16) -> tensor_pb2.TensorChunk:
    return tensor_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset=offset, data=data)


# ---- round trips ---------------------------------------------------------------


def test_chunked_round_trip_of_every_dtype_and_several_shapes() -> None:
    shapes = [(1,), (7,), (3, 5), (2, 3, 4), (2, 1, 3, 1)]
    arrays = {f"t{i}.{d}": _random(d, shapes[i % len(shapes)], seed=i) for i, d in enumerate(SUPPORTED)}
    # A small chunk size splits most tensors into several pieces, at sizes that do not
    # divide the element size evenly.
    for chunk_bytes in (3, 16, wire.CHUNK_BYTES):
        _assert_same(_round_trip(arrays, chunk_bytes), arrays)


def test_tensor_larger_than_one_chunk() -> None:
    big = _random("<f4", (wire.CHUNK_BYTES // 4 * 2 + 123,))
    chunks = list(wire.iter_chunks({"big": big}))
    assert len(chunks) == 3
    assert [c.offset for c in chunks] == [0, wire.CHUNK_BYTES, 2 * wire.CHUNK_BYTES]
    assert all(len(c.data) <= wire.CHUNK_BYTES for c in chunks)
    assert sum(len(c.data) for c in chunks) == big.nbytes
    _assert_same(_round_trip({"big": big, "small": np.arange(3, dtype=np.int64)}), {"big": big, "small": np.arange(3)})


def test_chunks_come_in_sorted_name_order_and_tensors_in_any_order_are_accepted() -> None:
    arrays = {"b": np.ones(5, np.float32), "a": np.zeros((2, 2), np.int32), "c": np.arange(4, dtype=np.uint8)}
    chunks = list(wire.iter_chunks(arrays, chunk_bytes=4))
    names = [c.name for c in chunks]
    assert names == sorted(names)
    assembler = wire.ChunkAssembler(wire.specs_of(arrays))
    for chunk in sorted(chunks, key=lambda c: c.name, reverse=True):  # tensors reversed, chunks still in order
        assembler.add(chunk)
    _assert_same(assembler.result(), arrays)


def test_non_contiguous_input_is_sent_as_its_c_order_values() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {"t": base.T, "s": base[:, ::2]}
    _assert_same(_round_trip(arrays, chunk_bytes=8), arrays)
    for array in arrays.values():
        assert np.array_equal(wire.from_proto(wire.to_proto(array)), array)


def test_one_dimensional_zero_size_tensor_round_trips() -> None:
    arrays = {"empty": np.zeros((0,), np.float32), "x": np.ones(2, np.int8)}
    chunks = [c for c in wire.iter_chunks(arrays) if c.name == "empty"]
    assert len(chunks) == 1 and chunks[0].data == b""
    _assert_same(_round_trip(arrays), arrays)
    back = wire.from_proto(wire.to_proto(arrays["empty"]))
    assert back.shape == (0,) and back.dtype == np.float32


def test_zero_size_tensor_with_a_zero_inner_dimension_whole_message() -> None:
    array = np.zeros((3, 0, 2), np.int64)
    back = wire.from_proto(wire.to_proto(array))
    assert back.shape == (3, 0, 2) and back.dtype == np.int64


def test_zero_size_tensor_with_a_zero_inner_dimension_chunked() -> None:
    arrays = {"empty": np.zeros((3, 0, 2), np.int64)}
    _assert_same(_round_trip(arrays), arrays)


def test_zero_dimensional_tensor_round_trips() -> None:
    scalar = np.array(7, np.int64)  # e.g. BatchNorm's num_batches_tracked
    assert wire.from_proto(wire.to_proto(scalar)).shape == ()
    _assert_same(_round_trip({"n": scalar}), {"n": scalar})


def test_whole_tensor_proto_round_trip() -> None:
    for i, dtype in enumerate(SUPPORTED):
        array = _random(dtype, (3, 4), seed=i)
        msg = wire.to_proto(array)
        assert msg.dtype == wire.dtype_to_proto(array.dtype)
        assert list(msg.shape) == [3, 4]
        assert msg.data == array.tobytes()
        # Through real serialization, as on the wire.
        back = wire.from_proto(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
        assert back.dtype == array.dtype and np.array_equal(back, array)


def test_spec_proto_round_trip() -> None:
    spec = wire.TensorSpec("layer.weight", np.dtype("<f2"), (3, 4))
    assert spec.nbytes == 24
    assert wire.spec_from_proto(spec.to_proto(), limit_bytes=24) == spec


def test_dtypes_without_a_wire_encoding_are_refused() -> None:
    for dtype in (np.float64, np.bool_, np.complex64, np.dtype(">f4")):
        with pytest.raises(wire.WireError, match="no wire encoding"):
            wire.dtype_to_proto(np.dtype(dtype))
    with pytest.raises(wire.WireError, match="no wire encoding"):
        wire.to_proto(np.zeros(2, np.float64))
    with pytest.raises(wire.WireError, match="no wire encoding"):
        list(wire.iter_chunks({"x": np.zeros(2, np.float64)}))


# ---- state_sha256 --------------------------------------------------------------


def test_state_sha256_is_deterministic_and_independent_of_order_and_layout() -> None:
    a = {"w": _random("<f4", (4, 3)), "b": np.arange(3, dtype=np.int64)}
    digest = wire.state_sha256(a)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert wire.state_sha256(a) == digest
    assert wire.state_sha256(dict(reversed(list(a.items())))) == digest
    assert wire.state_sha256({"w": np.asfortranarray(a["w"]), "b": a["b"].copy()}) == digest
    # The receiver hashes what it reassembled: same digest.
    assert wire.state_sha256(_round_trip(a, chunk_bytes=5)) == digest


def test_state_sha256_is_sensitive_to_name_dtype_shape_and_every_byte() -> None:
    w = np.arange(12, dtype=np.int32)
    digest = wire.state_sha256({"w": w})
    assert wire.state_sha256({"v": w}) != digest
    assert wire.state_sha256({"w": w.astype(np.float32)}) != digest
    assert wire.state_sha256({"w": w.view(np.uint8)}) != digest  # same bytes, other dtype
    assert wire.state_sha256({"w": w.reshape(3, 4)}) != digest  # same bytes, other shape
    assert wire.state_sha256({"w": w.reshape(4, 3)}) != wire.state_sha256({"w": w.reshape(3, 4)})
    assert wire.state_sha256({"w": w, "x": np.zeros(0, np.int32)}) != digest  # an extra empty tensor
    raw = bytearray(w.tobytes())
    raw[17] ^= 0x01
    assert wire.state_sha256({"w": np.frombuffer(bytes(raw), np.int32)}) != digest
    # Tensor boundaries are part of the content.
    one = np.arange(3, dtype=np.uint8)
    assert wire.state_sha256({"a": one[:2], "b": one[2:]}) != wire.state_sha256({"a": one})


# ---- ChunkAssembler rejections -------------------------------------------------


@pytest.fixture
def assembler() -> wire.ChunkAssembler:
    return wire.ChunkAssembler({"w": wire.TensorSpec("w", np.dtype("<f4"), (4,))})


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(wire.WireError, ValueError)


def test_rejects_an_unexpected_tensor_name(assembler: wire.ChunkAssembler) -> None:
    with pytest.raises(wire.WireError, match="unexpected tensor 'v'"):
        assembler.add(_chunk(name="v"))


def test_rejects_a_dtype_mismatch(assembler: wire.ChunkAssembler) -> None:
    with pytest.raises(wire.WireError, match="dtype"):
        assembler.add(_chunk(dtype=tensor_pb2.DTYPE_INT32))


@pytest.mark.parametrize("shape", [(2, 2), (5,), (), (4, 1)])
def test_rejects_a_shape_mismatch(assembler: wire.ChunkAssembler, shape: tuple[int, ...]) -> None:
    with pytest.raises(wire.WireError, match="shape"):
        assembler.add(_chunk(shape=shape))


@pytest.mark.parametrize("value", [tensor_pb2.DTYPE_UNSPECIFIED, tensor_pb2.DTYPE_BFLOAT16, 99])
def test_rejects_an_unsupported_dtype_enum_value(assembler: wire.ChunkAssembler, value: int) -> None:
    with pytest.raises(wire.WireError, match="unsupported dtype"):
        assembler.add(_chunk(dtype=value))


def test_rejects_an_out_of_order_offset(assembler: wire.ChunkAssembler) -> None:
    with pytest.raises(wire.WireError, match="offset 8, expected 0"):
        assembler.add(_chunk(offset=8, data=b"\0" * 8))
    assembler.add(_chunk(data=b"\0" * 8))
    with pytest.raises(wire.WireError, match="offset 0, expected 8"):  # a repeated chunk
        assembler.add(_chunk(data=b"\0" * 8))
    with pytest.raises(wire.WireError, match="offset 12, expected 8"):  # a gap
        assembler.add(_chunk(offset=12, data=b"\0" * 4))


def test_rejects_an_overrun(assembler: wire.ChunkAssembler) -> None:
    with pytest.raises(wire.WireError, match="overruns"):
        assembler.add(_chunk(data=b"\0" * 17))
    assembler.add(_chunk(data=b"\0" * 12))
    with pytest.raises(wire.WireError, match="overruns"):
        assembler.add(_chunk(offset=12, data=b"\0" * 5))
    assert assembler.bytes_received == 12


def test_rejects_an_empty_chunk_of_a_non_empty_tensor(assembler: wire.ChunkAssembler) -> None:
    with pytest.raises(wire.WireError, match="empty chunk"):
        assembler.add(_chunk(data=b""))


def test_rejects_a_tensor_sent_twice(assembler: wire.ChunkAssembler) -> None:
    assembler.add(_chunk())
    with pytest.raises(wire.WireError, match="sent twice"):
        assembler.add(_chunk())


def test_result_rejects_a_missing_tensor() -> None:
    specs = wire.specs_of({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    assembler = wire.ChunkAssembler(specs)
    for chunk in wire.iter_chunks({"a": np.zeros(2, np.float32)}):
        assembler.add(chunk)
    with pytest.raises(wire.WireError, match=r"missing or truncated tensors \['b'\]"):
        assembler.result()
    assert wire.ChunkAssembler({}).result() == {}


def test_result_rejects_a_truncated_tensor(assembler: wire.ChunkAssembler) -> None:
    assembler.add(_chunk(data=b"\0" * 12))
    with pytest.raises(wire.WireError, match=r"missing or truncated tensors \['w'\]"):
        assembler.result()


# ---- from_proto / spec_from_proto rejections -----------------------------------


@pytest.mark.parametrize("value", [tensor_pb2.DTYPE_UNSPECIFIED, tensor_pb2.DTYPE_BFLOAT16, 99])
def test_from_proto_rejects_an_unsupported_dtype(value: int) -> None:
    with pytest.raises(wire.WireError, match="unsupported dtype"):
        wire.from_proto(tensor_pb2.Tensor(dtype=value, shape=[1], data=b"\0" * 4))
    with pytest.raises(wire.WireError, match="unsupported dtype"):
        wire.spec_from_proto(tensor_pb2.TensorSpec(name="w", dtype=value, shape=[1]), limit_bytes=1 << 20)


@pytest.mark.parametrize("length", [0, 23, 25, 48])
def test_from_proto_rejects_data_not_matching_shape(length: int) -> None:
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * length)
    with pytest.raises(wire.WireError, match="needs 24"):
        wire.from_proto(msg)


def test_rejects_a_negative_dimension() -> None:
    with pytest.raises(wire.WireError, match="negative dimension"):
        wire.from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1, -4], data=b"\0" * 16))
    with pytest.raises(wire.WireError, match="negative dimension"):
        wire.spec_from_proto(tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, -1]), 1 << 20)


def test_rejects_over_the_byte_limit() -> None:
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], data=b"\0" * 16)
    assert wire.from_proto(msg, max_bytes=16).shape == (4,)
    with pytest.raises(wire.WireError, match="exceeds the limit of 15"):
        wire.from_proto(msg, max_bytes=15)
    # The limit is checked from the shape, before the data is looked at.
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[1 << 30]))
    spec = tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4])
    assert wire.spec_from_proto(spec, limit_bytes=16).nbytes == 16
    with pytest.raises(wire.WireError, match="exceeds the limit of 15"):
        wire.spec_from_proto(spec, limit_bytes=15)


def test_spec_from_proto_rejects_a_spec_without_a_name() -> None:
    with pytest.raises(wire.WireError, match="without a name"):
        wire.spec_from_proto(tensor_pb2.TensorSpec(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1]), 1 << 20)


def test_a_shape_whose_element_count_overflows_int64_is_over_the_limit() -> None:
    huge = [1 << 32, 1 << 32]
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.spec_from_proto(tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT32, shape=huge), 1 << 20)
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=huge))


def test_variable_length_spec_accepts_up_to_its_bound() -> None:
    bound = {"idx": wire.TensorSpec("idx", np.dtype("u1"), (10,), exact=False)}
    for length in (0, 3, 10):
        arrays = {"idx": np.arange(length, dtype=np.uint8)}
        assembler = wire.ChunkAssembler(bound)
        for chunk in wire.iter_chunks(arrays, chunk_bytes=4):
            assembler.add(chunk)
        np.testing.assert_array_equal(assembler.result()["idx"], arrays["idx"])
    for shape in ([11], [2, 2]):
        with pytest.raises(wire.WireError, match="at most"):
            wire.ChunkAssembler(bound).add(tensor_pb2.TensorChunk(name="idx", dtype=tensor_pb2.DTYPE_UINT8,
                                                                  shape=shape, data=b"\0"))
    assembler = wire.ChunkAssembler(bound)
    assembler.add(tensor_pb2.TensorChunk(name="idx", dtype=tensor_pb2.DTYPE_UINT8, shape=[4], data=b"\0\0"))
    with pytest.raises(wire.WireError, match="shape changed"):
        assembler.add(tensor_pb2.TensorChunk(name="idx", dtype=tensor_pb2.DTYPE_UINT8, shape=[8], offset=2,
                                             data=b"\0\0"))


def test_streamed_safetensors_files_read_back_with_the_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from cloud.tensorfile import write_tensors

    arrays = {
        "w": np.random.default_rng(0).random((3, 5), dtype=np.float32), "b": np.arange(7, dtype=np.int64),
        "q": np.arange(-3, 2, dtype=np.int8), "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(3.0, np.float32), "h": np.ones(3, np.float16), "t": np.arange(6, dtype=np.float32)[::2],
    }
    size, sha = write_tensors(tmp_path / "x.safetensors", arrays)
    assert sha == wire.state_sha256(arrays)
    assert size == (tmp_path / "x.safetensors").stat().st_size
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)


def test_tensor_file_reads_the_same_chunks_and_adds_in_slices(tmp_path: Path) -> None:
    from cloud.tensorfile import TensorFile, write_tensors

    rng = np.random.default_rng(3)
    arrays = {"b": rng.random(7, dtype=np.float32), "a.w": rng.random((300, 500), dtype=np.float32),
              "z": np.zeros((0, 4), np.float32)}
    write_tensors(tmp_path / "m.safetensors", arrays)
    stored = TensorFile(tmp_path / "m.safetensors")
    expected = list(wire.iter_chunks(arrays, chunk_bytes=4096))
    assert list(stored.chunks(chunk_bytes=4096)) == expected
    assert stored.chunk_count(chunk_bytes=4096) == len(expected) == wire.chunk_count(arrays, chunk_bytes=4096)
    assert [c.name for c in stored.chunks("7/")][:1] == ["7/a.w"]
    pieces = list(stored.slices("a.w", slice_bytes=1000))
    assert [first for first, _ in pieces] == list(range(0, 150_000, 250))
    np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), arrays["a.w"].reshape(-1))


def test_a_tensor_with_too_many_dimensions_is_refused() -> None:
    shape = [1] * (wire.MAX_DIMS + 1)
    with pytest.raises(wire.WireError, match="at most 32 dimensions"):
        wire.from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape, data=bytes(4)))


# ---- resumable chunking, and uploads spooled to disk ------------------------------


def _update_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"b.w": rng.standard_normal((70, 30), dtype=np.float32), "a.idx": np.arange(90, dtype=np.uint8),
            "c.empty": np.zeros((0,), np.float32), "d.q": rng.integers(-127, 127, 5000, dtype=np.int8)}


def test_iter_chunks_skip_leaves_out_exactly_the_first_chunks() -> None:
    arrays = _update_arrays()
    every = list(wire.iter_chunks(arrays, chunk_bytes=1000))
    for skip in range(len(every) + 1):
        assert list(wire.iter_chunks(arrays, chunk_bytes=1000, skip=skip)) == every[skip:]


def _spool_specs(arrays: dict[str, np.ndarray]) -> dict[str, wire.TensorSpec]:
    specs = wire.specs_of(arrays)
    specs["a.idx"] = wire.TensorSpec("a.idx", np.dtype(np.uint8), (400,), exact=False)  # sent shorter
    return specs


def test_a_spool_writes_a_safetensors_file_as_the_chunks_arrive(tmp_path: Path) -> None:
    from cloud.spool import Spool

    arrays = _update_arrays()
    spool = Spool(tmp_path / "u.part", _spool_specs(arrays))
    for chunk in wire.iter_chunks(arrays, chunk_bytes=1000):
        spool.add(chunk)
    file = spool.finish()
    assert spool.content_sha256() == wire.state_sha256(arrays)
    loaded = read_tensors(tmp_path / "u.part")  # the safetensors library reads it
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        np.testing.assert_array_equal(file.read(name), array)
    spool.move(tmp_path / "u.safetensors")
    spool.discard()  # a moved spool keeps its file
    assert (tmp_path / "u.safetensors").exists() and not (tmp_path / "u.part").exists()


def test_a_spool_refuses_tensors_out_of_order_or_interleaved(tmp_path: Path) -> None:
    from cloud.spool import Spool

    arrays = _update_arrays()
    chunks = list(wire.iter_chunks(arrays, chunk_bytes=1000))
    backwards = Spool(tmp_path / "b.part", _spool_specs(arrays))
    backwards.add(next(c for c in chunks if c.name == "d.q"))
    with pytest.raises(wire.WireError, match="out of order"):
        backwards.add(chunks[0])  # a.idx after d.q
    backwards.discard()
    spool = Spool(tmp_path / "u.part", _spool_specs(arrays))
    spool.add(chunks[0])  # a.idx, whole in one chunk
    spool.add(chunks[1])  # b.w begins
    with pytest.raises(wire.WireError, match="out of order"):
        spool.add(next(c for c in chunks if c.name == "c.empty"))  # before b.w is whole
    with pytest.raises(wire.WireError, match="missing"):
        spool.finish()
    spool.discard()
    assert not (tmp_path / "u.part").exists()


def test_a_chunk_whose_write_failed_can_be_sent_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills mid-chunk: half the bytes written, then ENOSPC. Nothing of that chunk
    counts, so the same chunk sent again (a resume) lands where it belongs."""
    import errno
    import os

    from cloud import spool as spool_module
    from cloud.spool import Spool

    arrays = _update_arrays()
    chunks = list(wire.iter_chunks(arrays, chunk_bytes=1000))
    spool = Spool(tmp_path / "u.part", _spool_specs(arrays))
    real = os.pwrite
    failing = {"armed": True}

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if failing["armed"] and len(data) > 1:
            failing["armed"] = False
            real(fd, data[: len(data) // 2], offset)
            return len(data) // 2
        if not failing["armed"] and failing.get("raised") is None:
            failing["raised"] = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    spool.add(chunks[0])
    monkeypatch.setattr(spool_module.os, "pwrite", pwrite)
    with pytest.raises(OSError):
        spool.add(chunks[1])
    monkeypatch.setattr(spool_module.os, "pwrite", real)
    for chunk in chunks[1:]:
        spool.add(chunk)
    spool.finish()
    loaded = read_tensors(tmp_path / "u.part")
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert spool.content_sha256() == wire.state_sha256(arrays)
