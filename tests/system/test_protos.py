"""The committed tandem.v1 code is exactly what protoc generates, and the contracts follow the style."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor

import tandem.v1

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
PACKAGE = Path("tandem") / "v1"
COMMITTED = ROOT / "services" / PACKAGE
FIX = "generated code is stale: run `make protos` and commit the result"


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*_pb2*.py*"))}


@pytest.mark.process  # python -m grpc_tools.protoc
def test_committed_code_matches_the_protos(tmp_path: Path) -> None:
    sources = sorted(str(p.relative_to(ROOT)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    assert sources, f"no .proto files under {PROTOS / PACKAGE}"
    # The same command as `make protos`, with output to a scratch directory.
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *sources],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"

    fresh = _generated_files(tmp_path / PACKAGE)
    committed = _generated_files(COMMITTED)
    assert len(fresh) == 3 * len(sources)  # _pb2.py, _pb2.pyi, _pb2_grpc.py per proto
    missing = sorted(set(fresh) - set(committed))
    assert not missing, f"{missing} not committed under {COMMITTED}: {FIX}"
    orphans = sorted(set(committed) - set(fresh))
    assert not orphans, f"{orphans} under {COMMITTED} have no .proto source: delete them, then {FIX}"
    differ = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not differ, f"{differ} differ from protoc's output: {FIX}"


def _modules() -> Iterator[ModuleType]:
    for info in pkgutil.iter_modules(tandem.v1.__path__):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(f"tandem.v1.{info.name}")


def _nested_enums(message: Descriptor) -> Iterator[EnumDescriptor]:
    yield from message.enum_types
    for nested in message.nested_types:
        yield from _nested_enums(nested)


def _all_enums() -> list[EnumDescriptor]:
    enums: list[EnumDescriptor] = []
    for module in _modules():
        file = module.DESCRIPTOR
        enums.extend(file.enum_types_by_name.values())
        for message in file.message_types_by_name.values():
            enums.extend(_nested_enums(message))
    return enums


def test_every_enum_starts_with_unspecified() -> None:
    enums = _all_enums()
    assert {e.full_name for e in enums} >= {"tandem.v1.DType", "tandem.v1.JobState", "tandem.v1.Placement"}
    bad = [
        f"{e.full_name}: zero value {e.values_by_number[0].name if 0 in e.values_by_number else 'missing'}"
        for e in enums
        if 0 not in e.values_by_number or not e.values_by_number[0].name.endswith("_UNSPECIFIED")
    ]
    assert not bad, "enums whose zero value is not *_UNSPECIFIED: " + "; ".join(bad)
