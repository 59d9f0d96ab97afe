"""What this agent can train: the tasks it is allowed (`--tasks`, default every
registered one), each loaded, its local data (`--data`) loaded through the task's
`load_data` and checked with its `check_data`, and offered to the coordinator in the
Hello with its fingerprint, ready or not (and why not).

Prepared once per process, off the event loop. Data is loaded once per (load_data
function, spec): the zoo's tasks share one load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tandem import tasks
from tandem.tasks import LoadedTask
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
MAX_REASON = 1000


@dataclass(frozen=True)
class Prepared:
    """One allowed task: loaded (None if it could not be), its data, and its offer."""

    name: str
    loaded: LoadedTask | None
    data: Any
    offer: pb.TaskOffer

    @property
    def ready(self) -> bool:
        return self.offer.ready


class Offers:
    """The tasks this agent offers, by name."""

    def __init__(self, prepared: Sequence[Prepared]) -> None:
        self._prepared = {p.name: p for p in prepared}

    @classmethod
    def prepare(cls, names: Sequence[str] | None, data_spec: str) -> Offers:
        """Load the tasks `names` (None: every registered one) and the data for each. A name
        given explicitly that is not installed is tasks.UnknownTask (the agent does not
        start); with the default list, tasks that fail to load are skipped with a warning.
        Blocking: call off the event loop."""
        explicit = names is not None
        cache: dict[tuple[object, str], Callable[[], Any]] = {}
        prepared: list[Prepared] = []
        for name in (names if names is not None else tasks.names()):
            try:
                loaded = tasks.get(name)
            except tasks.UnknownTask:
                if explicit:
                    raise
                log.warning("task %s is registered but not installed; not offered", name)
                continue
            except tasks.TaskError as exc:
                if not explicit:
                    log.warning("task %s cannot be loaded; not offered: %s", name, exc)
                    continue
                prepared.append(Prepared(name, None, None, pb.TaskOffer(name=name, ready=False,
                                                                         reason=_clip(str(exc)))))
                continue
            data, reason = _load(loaded, data_spec, cache)
            if reason:  # expected of most installed tasks on most data: a warning only where asked for
                log.log(logging.WARNING if explicit else logging.INFO, "task %s is offered not ready: %s", name, reason)
            prepared.append(Prepared(name, loaded, data, pb.TaskOffer(
                name=name, fingerprint=loaded.fingerprint, ready=not reason, reason=reason)))
        return cls(prepared)

    def get(self, name: str) -> Prepared | None:
        return self._prepared.get(name)

    def offers(self) -> list[pb.TaskOffer]:
        return [p.offer for p in self._prepared.values()]

    @property
    def num_examples(self) -> int:
        """Examples of the local data: the most any ready task's data holds (what an
        update may claim at most)."""
        return max((_length(p.data) for p in self._prepared.values() if p.ready), default=0)


def _load(loaded: LoadedTask, spec: str, cache: dict[tuple[object, str], Callable[[], Any]]) -> tuple[Any, str]:
    """(data, "") or (None, why the data does not fit the task)."""
    method = loaded.task.load_data
    key = (getattr(method, "__func__", method), spec)
    if key not in cache:
        try:
            data = method(spec)
        except Exception as exc:  # noqa: BLE001 - the user's load_data can raise anything
            failure = f"load_data({spec!r}) failed: {type(exc).__name__}: {exc}"
            cache[key] = lambda: (None, failure)
        else:
            cache[key] = lambda: (data, "")
    data, reason = cache[key]()
    if reason:
        return None, _clip(reason)
    try:
        loaded.task.check_data(data)
    except Exception as exc:  # noqa: BLE001 - check_data says why in its ValueError; anything else too
        return None, _clip(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))
    return data, ""


def _length(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 0


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."
