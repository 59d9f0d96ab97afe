"""Published model versions: files on disk, records in the store, a small cache."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cloud.store import Store, VersionRow, read_tensors, write_tensors
from tandem import codec, metrics, training, zoo
from tandem.errors import InvalidArgument, NotFound
from tandem.v1 import coordinator_pb2 as pb


class ModelRepository:
    """Reads and writes global model versions. Versions are numbered per model name."""

    def __init__(self, store: Store, cache_size: int = 1) -> None:
        self._store = store
        self._cache: OrderedDict[tuple[str, int], dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size
        self._specs: dict[str, dict[str, codec.TensorSpec]] = {}
        self._reserved: dict[str, int] = {}

    def specs(self, model: str) -> dict[str, codec.TensorSpec]:
        """The tensors every version (and every update) of `model` must have."""
        if model not in self._specs:
            if model not in zoo.model_names():
                raise NotFound(f"unknown model {model!r}; the zoo has {zoo.model_names()}")
            self._specs[model] = codec.specs_of(training.state_arrays(zoo.build_model(model)))
        return self._specs[model]

    def initial_arrays(self, model: str, seed: int) -> dict[str, np.ndarray]:
        arrays = training.state_arrays(zoo.build_model(model, seed=seed))
        self._specs.setdefault(model, codec.specs_of(arrays))
        return arrays

    async def write(self, model: str, arrays: Mapping[str, np.ndarray], job_id: str, round_: int) -> VersionRow:
        """Write the next version's file (not yet recorded: the caller commits it)."""
        # Reserve the number before any await, so concurrent writers never share one.
        version = max(self._store.next_version(model), self._reserved.get(model, 0) + 1)
        self._reserved[model] = version
        path = self._store.model_path(model, version)
        size = await asyncio.to_thread(write_tensors, path, arrays)
        sha = await asyncio.to_thread(codec.state_sha256, arrays)
        self._remember(model, version, dict(arrays))
        return VersionRow(model, version, sha, str(path), job_id, round_, time.time(), size)

    def published(self, row: VersionRow) -> None:
        metrics.MODEL_VERSION.labels(row.model).set(row.version)

    def version(self, model: str, version: int) -> VersionRow:
        if not model:
            raise InvalidArgument("model name is required")
        if version < 0:
            raise InvalidArgument(f"version must be >= 0, got {version}")
        row = self._store.get_version(model, version)
        if row is None:
            what = "no version" if version == 0 else f"no version {version}"
            raise NotFound(f"model {model!r} has {what}")
        return row

    async def load(self, model: str, version: int) -> tuple[VersionRow, dict[str, np.ndarray]]:
        row = self.version(model, version)
        key = (row.model, row.version)
        arrays = self._cache.get(key)
        if arrays is None:
            arrays = await asyncio.to_thread(read_tensors, Path(row.path))
            self._remember(row.model, row.version, arrays)
        else:
            self._cache.move_to_end(key)
        return row, arrays

    async def response(
        self, model: str, version: int, have_version: int
    ) -> tuple[pb.ModelHeader, dict[str, np.ndarray]]:
        """What to send an agent asking for `version` while holding `have_version`:
        the chain of encoded deltas between them when every step has one and they
        are smaller than the model, else the whole model."""
        row, arrays = await self.load(model, version)
        header = pb.ModelHeader(model=row.model, version=row.version, sha256=row.sha256)
        steps = self._chain(row, have_version)
        full_bytes = sum(int(a.nbytes) for a in arrays.values())
        if steps and sum(s.delta_bytes or 0 for s in steps) < full_bytes:
            payload: dict[str, np.ndarray] = {}
            for step in steps:
                assert step.delta_path is not None
                components = await asyncio.to_thread(read_tensors, Path(step.delta_path))
                payload.update({f"{step.version}/{name}": a for name, a in components.items()})
                header.steps.append(
                    pb.DeltaStep(from_version=step.delta_from, to_version=step.version, codec=step.delta_codec)
                )
        else:
            payload = arrays
            specs = codec.specs_of(arrays)
            header.tensors.extend(spec.to_proto() for spec in specs.values())
        header.total_bytes = sum(int(a.nbytes) for a in payload.values())
        header.total_chunks = codec.chunk_count(payload)
        return header, payload

    def _chain(self, row: VersionRow, have_version: int) -> list[VersionRow]:
        """Versions from have_version (exclusive) to row (inclusive), if deltas link them."""
        if have_version <= 0 or have_version >= row.version:
            return []
        chain = []
        while row.version != have_version:
            if row.delta_path is None or row.delta_from is None or row.delta_from < have_version:
                return []
            chain.append(row)
            previous = self._store.get_version(row.model, row.delta_from)
            if previous is None:
                return []
            row = previous
        return chain[::-1]

    def _remember(self, model: str, version: int, arrays: dict[str, np.ndarray]) -> None:
        self._cache[(model, version)] = arrays
        self._cache.move_to_end((model, version))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

