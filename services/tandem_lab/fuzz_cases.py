"""The fuzzer's cases: hostile values for every protobuf field type, messages built
from descriptors, one-field perturbations of valid messages, and byte-level mutations
(`tandem_lab.fuzz` sends them)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MODEL = "mlp-small"  # tiny: valid jobs and publishes cost next to nothing

# ---- values ---------------------------------------------------------------------

_INT_RANGES = {
    **dict.fromkeys((FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
                     FieldDescriptor.TYPE_ENUM), (-(2**31), 2**31 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64),
                    (-(2**63), 2**63 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64), (0, 2**64 - 1)),
}
_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e-9, 0.5, 1.01, 3.4e38]
# Huge values are made when drawn, so that strategies' reprs stay short.
_HUGE_STRINGS = st.sampled_from([("a", 300_000), ("é", 100_000), ("\U0001f4a5", 20_000)]).map(lambda t: t[0] * t[1])
_STRINGS = ["", "\x00", " ", "../../../etc/passwd", "%s%n",
            "'; DROP TABLE jobs; --", "\u202e", "split:-1", "split:99999999999999999999", "cascade:nan",
            "cascade:0.5:mlp", "topk:nan", "topk:1e-300+int8", "topk:0.01+int8", "fp16", "int8", "auto", "none",
            "edge", "cloud", "split:1", "digits", "median", "krum", "fedadam", "mlp", MODEL]
_HUGE_BYTES = st.sampled_from([(b"\x00", 1 << 20), (b"\xff", 9 << 20), (b"", 65536)]).map(
    lambda t: t[0] * t[1] if t[0] else np.random.default_rng(t[1]).bytes(t[1]))


@dataclass(frozen=True)
class Context:
    """Values that mean something to the server, mixed into the hostile ones to get past the first checks."""

    strings: tuple[str, ...] = ()
    ints: tuple[int, ...] = ()


def _integers(lo: int, hi: int, ctx: Context) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, hi, lo + 1, hi - 1, -1, 0, 1, 2, 3, *ctx.ints) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _scalar(f: FieldDescriptor, ctx: Context) -> st.SearchStrategy[Any]:
    if f.type in _INT_RANGES:
        return _integers(*_INT_RANGES[f.type], ctx)
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from(_FLOATS), st.floats(width=64 if f.type == f.TYPE_DOUBLE else 32))
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from([*ctx.strings, *_STRINGS]), _HUGE_STRINGS, st.text(max_size=24))
    return st.one_of(_HUGE_BYTES, st.binary(max_size=64))


_SMALL = {FieldDescriptor.TYPE_STRING: st.sampled_from(["", "a", MODEL]),
          FieldDescriptor.TYPE_BYTES: st.sampled_from([b"", b"x"])}


def _single(f: FieldDescriptor, ctx: Context, depth: int) -> st.SearchStrategy[Any]:
    return message_strategy(f.message_type, ctx, depth + 1) if f.message_type else _scalar(f, ctx)


def _empty(desc: Descriptor) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(desc)
    return st.just(None).map(lambda _: cls())


def _zero(f: FieldDescriptor) -> Any:
    """A function making the zero value of field `f`'s type (an empty message for a message)."""
    if f.message_type is not None:
        cls = message_factory.GetMessageClass(f.message_type)
        return lambda: cls()
    zero: Any = {FieldDescriptor.TYPE_STRING: "", FieldDescriptor.TYPE_BYTES: b"",
                 FieldDescriptor.TYPE_BOOL: False}.get(f.type, 0)
    return lambda: zero


def field_strategy(f: FieldDescriptor, ctx: Context, depth: int = 0) -> st.SearchStrategy[Any]:
    """A hostile value for field `f`: a scalar, a message, a list or a dict, as the field is."""
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        name = (lambda i: f"k{i}") if key.type == key.TYPE_STRING else (lambda i: i)
        zero = _zero(value)
        many = st.integers(0, 5000).map(lambda n: {name(i): zero() for i in range(n)})
        return st.one_of(st.dictionaries(_scalar(key, ctx), _single(value, ctx, depth), max_size=3), many)
    if f.is_repeated:
        small = _SMALL.get(f.type) or (_empty(f.message_type) if f.message_type else _scalar(f, ctx))
        copies = st.tuples(small, st.sampled_from([1000, 50_000] if f.message_type is None else [1000]))
        return st.one_of(st.lists(_single(f, ctx, depth), max_size=3), copies.map(lambda t: [t[0]] * t[1]))
    return _single(f, ctx, depth)


def assign(msg: Message, f: FieldDescriptor, value: Any) -> None:
    """Set field `f` of `msg` to `value` (replacing what was there)."""
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        target = getattr(msg, f.name)
        target.clear()
        for k, v in value.items():
            if isinstance(v, Message):
                target[k].CopyFrom(v)
            elif v is None:
                target[k].SetInParent()  # an empty message under this key
            else:
                target[k] = v
    elif f.is_repeated:
        target = getattr(msg, f.name)
        del target[:]
        if f.message_type is not None:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif f.message_type is not None:
        getattr(msg, f.name).CopyFrom(value)
    else:
        setattr(msg, f.name, value)


_MESSAGES: dict[tuple[str, Context, int], st.SearchStrategy[Message]] = {}


def message_strategy(desc: Descriptor, ctx: Context, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of type `desc` with some fields set to hostile values, recursively (depth-limited)."""
    key = (desc.full_name, ctx, depth)
    if key not in _MESSAGES:
        cls = message_factory.GetMessageClass(desc)
        if depth > 3 or not desc.fields:
            _MESSAGES[key] = _empty(desc)
        else:
            pairs = st.one_of([st.tuples(st.just(f), field_strategy(f, ctx, depth)) for f in desc.fields])

            def build(chosen: list[tuple[FieldDescriptor, Any]]) -> Message:
                msg = cls()
                for f, value in chosen:
                    assign(msg, f, value)
                return msg

            _MESSAGES[key] = st.lists(pairs, max_size=len(desc.fields) + 1).map(build)
    return _MESSAGES[key]


@st.composite
def perturbed(draw: st.DrawFn, seed: Message, ctx: Context) -> Message:
    """A valid message with one field, at the top or nested, made hostile."""
    msg = type(seed).FromString(seed.SerializeToString())
    target = msg
    for depth in range(4):
        desc = cast(Descriptor, target.DESCRIPTOR)
        if not desc.fields:
            break
        f = draw(st.sampled_from(list(desc.fields)))
        nested = f.message_type is not None and not f.is_repeated and target.HasField(f.name)
        if nested and depth < 3 and draw(st.booleans()):
            target = getattr(target, f.name)
            continue
        assign(target, f, draw(field_strategy(f, ctx, 2)))
        break
    return msg


@st.composite
def spliced(draw: st.DrawFn, seeds: Sequence[Sequence[Message]], ctx: Context) -> list[Message]:
    """A seed sequence with one or two of its messages perturbed."""
    seq = list(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(seq) - 1))
        seq[i] = draw(perturbed(seq[i], ctx))
    return seq


def serialize(messages: Sequence[Message]) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


# ---- byte mutation ----------------------------------------------------------------

_EDITS = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "varint", "repeat"]),
                            st.integers(0, 1 << 20), st.binary(min_size=1, max_size=12)), min_size=1, max_size=4)


def mutate(data: bytes, edits: Iterable[tuple[str, int, bytes]]) -> bytes:
    """Apply byte edits to serialized data: the wire format may break anywhere."""
    b = bytearray(data)
    for op, pos, blob in edits:
        at = pos % (len(b) + 1)
        if op == "flip" and b:
            b[at % len(b)] ^= blob[0] or 0x80
        elif op == "insert":
            b[at:at] = blob
        elif op == "delete":
            del b[at : at + 4 * len(blob)]
        elif op == "truncate":
            del b[at:]
        elif op == "varint":  # an overlong or unterminated varint
            b[at:at] = b"\xff" * 9 + (b"\x01" if blob[0] & 1 else b"\xff")
        else:
            b[at:at] = b[at : at + 8 * len(blob)]
    return bytes(b)


class Seeds(list[Sequence[Message]]):
    """Valid message sequences to start from, with a short repr (hypothesis prints strategies)."""

    def __repr__(self) -> str:
        return f"<{len(self)} valid sequences>"


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[Sequence[Message]]) -> list[bytes]:
    """A seed sequence with messages mutated, dropped, duplicated or swapped."""
    out = [m.SerializeToString() for m in draw(st.sampled_from(seeds))]
    for op, index, edits in draw(st.lists(st.tuples(st.sampled_from(["mutate", "mutate", "drop", "dup", "swap"]),
                                                    st.integers(0, 63), _EDITS), min_size=1, max_size=3)):
        if not out:
            break
        i = index % len(out)
        if op == "mutate":
            out[i] = mutate(out[i], edits)
        elif op == "drop" and len(out) > 1:
            del out[i]
        elif op == "dup":
            out.insert(i, out[i])
        elif op == "swap":
            out[i], out[-1] = out[-1], out[i]
    return out
