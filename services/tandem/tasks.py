"""Finding, loading and fingerprinting tasks (the SDK's `Task`) by name.

A name is `PACKAGE.MODULE:ATTRIBUTE` or a short name registered under the entry-point
group `tandem.tasks` by an installed package (the built-in zoo registers `mlp`, `cnn`,
...; it is also known without being installed, so a source checkout works). The
attribute is a Task subclass, a Task instance, or a function returning one.

Loading happens once per process (`get` caches; call it off the event loop): the task
is built on the meta device to learn its state (names, shapes, dtypes) without
allocating it, and fingerprinted. Coordinator and agents compare fingerprints and
refuse to mix them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch
from torch import nn

from tandem import wire
from tandem.task import Task

GROUP = "tandem.tasks"
_QUALIFIED = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SHORT = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")
_BUILTIN = {  # the zoo, as its entry points in pyproject.toml name it
    name: f"tandem.zoo:{attr}" for name, attr in (
        ("mlp", "MLP"), ("mlp10m", "MLP10M"), ("mlp250m", "MLP250M"), ("mlp-small", "MLP_SMALL"),
        ("mlp-heavy", "MLP_HEAVY"), ("cnn", "CNN"),
    )
}
# One torch RNG per process: seeded builds are serialised (a model loaded on another
# thread would otherwise draw from the generator in the middle of a seeded build).
_BUILD_LOCK = threading.RLock()
_LOAD_LOCK = threading.Lock()  # guards _NAME_LOCKS
_NAME_LOCKS: dict[str, threading.Lock] = {}
_LOADED: dict[str, LoadedTask] = {}


class TaskError(ValueError):
    """A task that is unknown, cannot be loaded, or is not a valid Task."""


class UnknownTask(TaskError, KeyError):
    """No task of that name is installed (a KeyError too: NOT_FOUND where names are looked up)."""

    def __str__(self) -> str:
        return str(self.args[0])


def registered() -> dict[str, str]:
    """Short name -> `module:attribute` of every task installed packages register (and the zoo)."""
    found = dict(_BUILTIN)
    for entry in metadata.entry_points(group=GROUP):
        found[entry.name] = entry.value
    return found


def names() -> list[str]:
    """The short names of every registered task, sorted."""
    return sorted(registered())


def is_known(name: str) -> bool:
    """Whether `name` is registered or looks like `module:attribute` (without importing it)."""
    return name in registered() or _QUALIFIED.fullmatch(name) is not None


@dataclass(frozen=True)
class StateEntry:
    """One tensor of a task's model state."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name, e.g. "float32", "int64"
    federated: bool  # False: kept on the device (integer, or matched by Task.local)


class LoadedTask:
    """A task loaded under `name`: the user's Task, what its model's state holds, its
    fingerprint, and seeded builds."""

    def __init__(self, name: str, task: Task) -> None:
        self.name, self.task = name, task
        task.name = name
        self.state = self._describe()
        self.fingerprint = _fingerprint(name, task.version, self.state)
        self.specs: dict[str, wire.TensorSpec] = {
            e.name: wire.TensorSpec(e.name, np.dtype(np.float32), e.shape) for e in self.state if e.federated
        }
        if not self.specs:
            raise TaskError(f"task {name!r} has no floating-point tensors to federate")

    def _describe(self) -> tuple[StateEntry, ...]:
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = self.task.build(0)
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {self.name!r}: build(seed) returned {type(model).__name__}, not a torch.nn.Module")
        entries = []
        for key, tensor in model.state_dict().items():
            local = any(fnmatch.fnmatchcase(key, pattern) for pattern in self.task.local)
            entries.append(StateEntry(key, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                                      tensor.is_floating_point() and not local))
        return tuple(entries)

    @property
    def version(self) -> str:
        return self.task.version

    @property
    def local_keys(self) -> list[str]:
        return [e.name for e in self.state if not e.federated]

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh model whose weights depend only on (task, seed); the caller's RNG is untouched."""
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.task.build(seed)

    def state_arrays(self, model: nn.Module) -> dict[str, np.ndarray]:
        """C-contiguous float32 copies of the federated tensors of `model`'s state."""
        state = model.state_dict()
        return {key: np.array(state[key].detach().cpu().numpy(), dtype=np.float32, order="C") for key in self.specs}

    def load_arrays(self, model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
        """Load the federated tensors into `model` (local ones are left as they are);
        names and shapes must match exactly (ValueError)."""
        missing = sorted(set(self.specs) - set(arrays))
        unexpected = sorted(set(arrays) - set(self.specs))
        if missing or unexpected:
            raise ValueError(f"state mismatch for {self.name}: missing {missing}, unexpected {unexpected}")
        state = model.state_dict()
        for key, spec in self.specs.items():
            if tuple(np.shape(arrays[key])) != spec.shape:
                raise ValueError(f"state mismatch for {key!r}: expected shape {spec.shape}, "
                                 f"got {tuple(np.shape(arrays[key]))}")
        with torch.no_grad():
            for key in self.specs:
                # np.array copies (read-only inputs are fine); copy_ casts to the tensor's dtype.
                state[key].copy_(torch.from_numpy(np.array(arrays[key])))


def _fingerprint(name: str, version: str, state: tuple[StateEntry, ...]) -> str:
    """16 hex digits naming (name, version, the state's names, shapes, dtypes, federated)."""
    body = json.dumps({"name": name, "version": version,
                       "state": [[e.name, list(e.shape), e.dtype, e.federated] for e in state]},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def get(name: str) -> LoadedTask:
    """The task called `name`, loaded once per process; TaskError saying why not.

    A loaded task is answered without a lock (callers on an event loop ask often); a
    first load holds a lock of its own name only, so one slow import stalls no other."""
    loaded = _LOADED.get(name)
    if loaded is not None:
        return loaded
    with _LOAD_LOCK:
        lock = _NAME_LOCKS.setdefault(name, threading.Lock())
    with lock:
        loaded = _LOADED.get(name)
        if loaded is None:
            loaded = _LOADED[name] = _load(name)
        return loaded


def _load(name: str) -> LoadedTask:
    target = registered().get(name)
    if target is None:
        if _QUALIFIED.fullmatch(name) is None:
            raise UnknownTask(f"unknown task {name!r}: not registered under {GROUP!r} by any installed package "
                              f"(known: {', '.join(names())}) and not of the form PACKAGE.MODULE:ATTRIBUTE")
        target = name
    module_name, _, attribute = target.partition(":")
    try:
        found: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise UnknownTask(f"task {name!r} ({target}) is not installed here: {exc}") from None
        raise TaskError(f"task {name!r} ({target}) cannot be loaded: {exc}") from None  # a dependency it lacks
    except Exception as exc:  # noqa: BLE001 - a user's module can raise anything while it is imported
        raise TaskError(f"task {name!r} ({target}) cannot be loaded: {type(exc).__name__}: {exc}") from None
    try:
        return LoadedTask(name, _instance(name, found))
    except TaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's constructor or build() can raise anything
        raise TaskError(f"task {name!r}: loading it failed: {type(exc).__name__}: {exc}") from None


def _instance(name: str, found: object) -> Task:
    if isinstance(found, type) and issubclass(found, Task):
        return found()
    if isinstance(found, Task):
        return found
    if callable(found):
        made = found()
        if isinstance(made, Task):
            return made
    raise TaskError(f"task {name!r} is {type(found).__name__}, not a tandem.Task (a subclass, an instance, "
                    "or a function returning one)")


def valid_name(name: str) -> bool:
    """Whether `name` could name a task at all (short or qualified), for validating input."""
    return bool(_SHORT.fullmatch(name) or _QUALIFIED.fullmatch(name)) and len(name) <= 200
