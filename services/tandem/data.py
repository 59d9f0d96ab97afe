"""Datasets for training and evaluation: the reference digits workload and local files.

An edge agent names its data with a spec string: ``digits:I/N`` (partition I of N of
the reference digits training split, for demos and benchmarks) or a directory of
``.npz`` / ``.safetensors`` files (real local data). Nothing here ever unpickles.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DIGITS_SPEC = re.compile(r"digits:(\d+)/(\d+)")
_EVAL_NAMES = ("digits",)


@dataclass(frozen=True)
class Dataset:
    """Examples ``x`` (float32 ``[n, features]``) with labels ``y`` (int64 ``[n]``)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@functools.cache
def digits_split() -> tuple[Dataset, Dataset]:
    """The reference workload's (train, test) split of scikit-learn's digits (docs/design.md)."""
    # Lazy: scikit-learn costs a second to import and only this function needs it.
    from sklearn.datasets import load_digits  # type: ignore[import-untyped, unused-ignore]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped, unused-ignore]

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float64).reshape(-1, 64) / 16.0).astype(
        np.float32
    )
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    return (
        _frozen(Dataset(np.ascontiguousarray(x_train), np.ascontiguousarray(y_train))),
        _frozen(Dataset(np.ascontiguousarray(x_test), np.ascontiguousarray(y_test))),
    )


def _frozen(data: Dataset) -> Dataset:
    # The split is cached and shared: make accidental in-place edits fail loudly.
    data.x.flags.writeable = False
    data.y.flags.writeable = False
    return data


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split example indices over clients with Dirichlet label skew, deterministically.

    Per class, proportions ~ Dir(alpha) over clients; if any client ends up with fewer
    than ``min_size`` examples the whole draw is redone with seed+1, seed+2, ...
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients * min_size > labels.shape[0]:
        raise ValueError(
            f"cannot give {num_clients} clients {min_size} examples each "
            f"from {labels.shape[0]} examples"
        )
    classes = np.unique(labels)
    # A bounded search: a feasible draw is found within a few tries for sane inputs.
    for attempt_seed in range(seed, seed + 10_000):
        rng = np.random.default_rng(attempt_seed)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(proportions)[:-1] * idx.shape[0]).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(r.shape[0] for r in result) >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet draw gave every one of {num_clients} clients {min_size} examples"
    )


def parse_digits_spec(spec: str) -> tuple[int, int] | None:
    """``(I, N)`` for a ``digits:I/N`` spec, None for anything not starting ``digits:``."""
    if not spec.startswith("digits:"):
        return None
    match = _DIGITS_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"bad data spec {spec!r}: expected 'digits:I/N', e.g. 'digits:0/4'")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad data spec {spec!r}: need 0 <= I < N and N >= 1")
    return index, count


def load_data(spec: str) -> Dataset:
    """Training data named by ``spec``: ``digits:I/N`` or a directory of data files."""
    if not spec:
        raise ValueError("empty data spec: expected 'digits:I/N' or a directory path")
    parsed = parse_digits_spec(spec)
    if parsed is not None:
        index, count = parsed
        train, _ = digits_split()
        try:
            parts = dirichlet_partition(train.y, count)
        except ValueError as exc:
            raise ValueError(f"bad data spec {spec!r}: {exc}") from exc
        idx = parts[index]
        return Dataset(train.x[idx], train.y[idx])
    return _load_dir(Path(spec))


def _load_dir(directory: Path) -> Dataset:
    if not directory.is_dir():
        raise ValueError(f"data directory {str(directory)!r} does not exist or is not a directory")
    files = sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.suffix in (".npz", ".safetensors")
    )
    if not files:
        raise ValueError(f"data directory {str(directory)!r} holds no .npz or .safetensors files")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for path in files:
        x, y = _load_file(path)
        if xs and x.shape[1] != xs[0].shape[1]:
            raise ValueError(
                f"{path}: x has {x.shape[1]} features, earlier files have {xs[0].shape[1]}"
            )
        xs.append(x)
        ys.append(y)
    return Dataset(np.concatenate(xs), np.concatenate(ys))


def _load_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays: dict[str, np.ndarray]
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in ("x", "y") if k in npz.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as exc:  # corrupt files raise a zoo of types; report them uniformly
        raise ValueError(f"{path}: cannot read: {exc}") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; need 'x' and 'y'")
    x, y = arrays["x"], arrays["y"]
    if x.ndim != 2:
        raise ValueError(f"{path}: x must be 2-D [n, features], got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{path}: y must be 1-D with {x.shape[0]} entries, got shape {y.shape}")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"{path}: x must be numeric and y integer, got {x.dtype} and {y.dtype}")
    return x.astype(np.float32), y.astype(np.int64)


def partition_index(spec: str) -> int:
    """The I of ``digits:I/N``, 0 for a directory: used to derive shuffle seeds."""
    parsed = parse_digits_spec(spec)
    return 0 if parsed is None else parsed[0]


def eval_dataset(name: str) -> Dataset:
    """The held-out evaluation set called ``name`` (only ``digits`` so far)."""
    if name == "digits":
        return digits_split()[1]
    raise ValueError(f"unknown evaluation dataset {name!r}; known: {', '.join(_EVAL_NAMES)}")
