"""The model versions an edge agent serves locally.

The agent learns of serving versions from the coordinator (its Welcome and the
ModelNotices marked `serving`: a promotion or a rollback), fetches the serving
version of every model it serves (as deltas from the one it holds where it can) and
swaps it in; requests in flight finish on the version they started with. Candidates
(notices not marked serving) are never served here. A model nobody asked for is
fetched on its first request; one with no serving version is FAILED_PRECONDITION.

Staged rollouts (issue 16): the version served before a swap stays in memory (one per
model), so that a rollback, of a canary or of a promotion, is a swap back with no
download; and a notice marked `canary` makes this agent a canary of the new version,
which compares it with that previous one (`previous`, edge.shadow) until a later
serving notice without the mark (the rollout proceeded, or rolled back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from tandem import metrics, tasks
from tandem.errors import FailedPrecondition, NotFound, Unavailable
from tandem.staged import StagedModel
from tandem.transfer import HeldVersion

log = logging.getLogger(__name__)

# (model, version, sha256, the version held to patch, if any) -> the version's tensors
Fetch = Callable[[str, int, str, HeldVersion | None], Awaitable[Mapping[str, np.ndarray]]]


@dataclass
class _Served:
    model: StagedModel
    held: HeldVersion  # its tensors, for patching with the next version's deltas


def _ready(name: str, version: int, sha: str, arrays: Mapping[str, np.ndarray], device: str) -> StagedModel:
    model = StagedModel(name, version, sha, arrays, device)
    model.profile(0, model.num_stages)  # warm up, and a first cost for every stage
    return model


class EdgeModels:
    def __init__(self, fetch: Fetch, device: str = "cpu") -> None:
        self._fetch = fetch
        self._device = device
        self._known: dict[str, tuple[int, str]] = {}  # model -> serving (version, sha256) announced
        self._served: dict[str, _Served] = {}
        self._previous: dict[str, _Served] = {}  # model -> the version served before the current one
        self._canary: dict[str, int] = {}  # model -> the version this agent is a canary of
        self._wanted: set[str] = set()
        self._updating: dict[str, asyncio.Task[None]] = {}

    def want(self, names: list[str]) -> None:
        """Serve these models: fetch each as soon as a version is known."""
        self._wanted.update(names)
        for name in names:
            self._refresh(name)

    def announce(self, name: str, version: int, sha256: str, serving: bool = True, canary: bool = False) -> None:
        """The coordinator has published `version` of `name`; with `serving`, it is now
        the model's serving version (higher or lower than the one held: a rollback), and
        with `canary` too, this agent is a canary of it. The previous version, if that is
        the one named, is swapped back in at once."""
        if not serving:
            return  # a candidate: served at the coordinator by explicit version only
        self._known[name] = (version, sha256)
        if canary:
            self._canary[name] = version
        else:
            self._canary.pop(name, None)
        if name in self._wanted:
            self._swap_back(name)
            self._refresh(name)

    def served(self) -> list[StagedModel]:
        return [s.model for s in self._served.values()]

    def held_version(self, name: str) -> int:
        """The version of `name` served here (0: none yet)."""
        served = self._served.get(name)
        return served.model.version if served is not None else 0

    def previous(self, name: str) -> StagedModel | None:
        """The version served before, while this agent is a canary of the one it serves now:
        what the canary's answers are compared with."""
        served, previous = self._served.get(name), self._previous.get(name)
        if served is None or previous is None or self._canary.get(name) != served.model.version:
            return None
        return previous.model

    def _swap_back(self, name: str) -> bool:
        """Serve the previous version again if it is the one announced (no download)."""
        previous, known = self._previous.get(name), self._known.get(name)
        if previous is None or known != (previous.model.version, previous.held.sha256):
            return False
        self._swap_in(name, previous)
        return True

    def _swap_in(self, name: str, new: _Served) -> None:
        """Serve `new`, keeping the version it replaces as the previous one."""
        old = self._served.get(name)
        self._served[name] = new
        if old is not None and old.model.version != new.model.version:
            self._previous[name] = old
        metrics.MODEL_VERSION.labels(name).set(new.model.version)
        metrics.SERVING_VERSION.labels(name).set(new.model.version)
        log.info("serving %s v%d at the edge%s", name, new.model.version,
                 " (a canary)" if self._canary.get(name) == new.model.version else "")

    def _refresh(self, name: str) -> None:
        known = self._known.get(name)
        running = self._updating.get(name)
        if known is None or known[0] == self.held_version(name) or (running is not None and not running.done()):
            return
        self._updating[name] = asyncio.create_task(self._update(name), name=f"fetch-{name}")

    async def _update(self, name: str) -> None:
        try:
            while True:
                version, sha = self._known[name]
                served = self._served.get(name)
                if (served is not None and served.model.version == version) or self._swap_back(name):
                    return
                arrays = await self._fetch(name, version, sha, served.held if served is not None else None)
                model = await asyncio.to_thread(_ready, name, version, sha, arrays, self._device)
                if self._known[name] != (version, sha):
                    continue  # another version was announced meanwhile: serve that one, not this
                self._swap_in(name, _Served(model, HeldVersion(version, sha, arrays)))
        except Exception as exc:  # noqa: BLE001 - the next announcement, request or reconnect tries again
            log.warning("could not fetch %s for serving: %s", name, exc)

    async def get(self, name: str, version: int) -> StagedModel:
        """The version of `name` to answer with here (0: the serving one held)."""
        served = self._served.get(name)
        if served is None:
            if name not in self._known:
                if not tasks.is_known(name):
                    raise NotFound(f"this agent knows no model {name!r}")
                raise FailedPrecondition(
                    f"model {name!r} has no serving version that this agent knows of: promote one "
                    f"(`tandem models promote {name} VERSION`)")
            try:  # a task not installed here could never be fetched: say so, not "try again"
                await asyncio.to_thread(tasks.get, name)
            except tasks.UnknownTask as exc:
                raise NotFound(f"model {name!r} cannot be served at this agent: {exc}") from None
            except tasks.TaskError as exc:
                raise FailedPrecondition(f"model {name!r} cannot be served at this agent: {exc}") from None
            self.want([name])
            task = self._updating.get(name)
            if task is not None:
                await asyncio.shield(task)
            served = self._served.get(name)
            if served is None:
                raise Unavailable(f"model {name!r} is not available at this agent yet; try again")
        if version not in (0, served.model.version):
            raise NotFound(f"this agent serves {name} v{served.model.version}, not v{version}")
        return served.model
