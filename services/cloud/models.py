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


class ModelRepository:
    """Reads and writes global model versions. Versions are numbered per model name."""

    def __init__(self, store: Store, cache_size: int = 4) -> None:
        self._store = store
        self._cache: OrderedDict[tuple[str, int], dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size
        self._specs: dict[str, dict[str, codec.TensorSpec]] = {}

    def specs(self, model: str) -> dict[str, codec.TensorSpec]:
        """The tensors every version (and every update) of `model` must have."""
        if model not in self._specs:
            if model not in zoo.model_names():
                raise NotFound(f"unknown model {model!r}; the zoo has {zoo.model_names()}")
            self._specs[model] = codec.specs_of(training.state_arrays(zoo.build_model(model)))
        return self._specs[model]

    def initial_arrays(self, model: str, seed: int) -> dict[str, np.ndarray]:
        self.specs(model)
        return training.state_arrays(zoo.build_model(model, seed=seed))

    async def write(self, model: str, arrays: Mapping[str, np.ndarray], job_id: str, round_: int) -> VersionRow:
        """Write the next version's file (not yet recorded: the caller commits it)."""
        version = self._store.next_version(model)
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

    def _remember(self, model: str, version: int, arrays: dict[str, np.ndarray]) -> None:
        self._cache[(model, version)] = arrays
        self._cache.move_to_end((model, version))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

