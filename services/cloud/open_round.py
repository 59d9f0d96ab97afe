"""The open round of one job: who was asked, what arrived, and the running sum.

The round is the one owner of that state. Admitting, committing and closing are its
operations, and they take its lock, so that an update acknowledged to an agent is
always in the sum the close aggregates, and none slips in after the close began.
What must survive a restart goes to the store (`RoundRecords`) as it changes.

Each update is folded in as it arrives, before the round's median example count (and
so the cap on claimed counts, `cloud.aggregation.weights`) is known. It is folded with a
provisional weight: its claim, bounded by the cap the selected agents' Hellos predict.
At the close `reweigh` folds the updates whose provisional weight differs from their
capped one again, with the difference: the sum is then exactly sum(capped_i x delta_i),
and the provisional bound keeps any weight in the float32 sum near the cap, so that a
claim of 2^40 never swamps the honest updates' digits before it is taken out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from cloud.accumulator import Accumulator
from cloud.aggregation import Weighting, weighting
from cloud.phases import RoundClock
from cloud.store import UpdateRow, VersionRow
from cloud.tensorfile import TensorFile
from tandem import compression
from tandem.compression import Codec
from tandem.errors import AlreadyExists, FailedPrecondition, InvalidArgument


class RoundRecords(Protocol):
    """What a round writes to the store (`cloud.store.Store` is one)."""

    def open_round(
        self, job_id: str, round_: int, attempt: int, base_version: int, selected: list[str], deadline: float
    ) -> None: ...

    def set_selected(self, job_id: str, round_: int, selected: list[str]) -> None: ...

    def add_update(self, job_id: str, round_: int, row: UpdateRow, wire_bytes: int) -> None: ...


class OpenRound:
    """Round `number` of a job while it accepts updates, and while it closes."""

    def __init__(
        self, job_id: str, number: int, base: VersionRow, attempt: int, selected: list[str], deadline: float,
        accumulator: Accumulator, records: RoundRecords, default_codec: str | None,
        released: Callable[[], None] | None = None,
    ) -> None:
        self._job_id = job_id
        self._number = number
        self._base = base
        self._attempt = attempt
        self._selected = sorted(selected)
        self._deadline = deadline
        self._accumulator = accumulator
        self._records = records
        # The codec an agent's update must use when no task assigned one (None: any).
        self._default_codec = default_codec
        self._codecs: dict[str, str] = {}  # agent -> codec of its task, chosen once per round
        # Agents whose update is recorded: the one set, kept with the sum under the lock.
        self._submitted: set[str] = set()
        self._contributors: dict[str, int] = {}  # member -> agents its update stands for (a region's: more than 1)
        self._accepting = True
        # Held while an accepted update is recorded and folded in, and by the close, so
        # that the close sees every acknowledged update in the sum.
        self._lock = asyncio.Lock()
        self._arrived = asyncio.Event()
        self._released = released  # told once the round is released (its partial uploads can go)
        # The most an update is folded with before the close (None: its claim); see the module's docstring.
        self._provisional_cap: float | None = None
        self._folded: dict[str, float] = {}  # agent -> the weight its update is in the sum with
        self.clock = RoundClock()  # where the round's time goes (cloud.phases)
        # Bytes of model downloads that trained this round, recorded with its close: a
        # commit (an fsync) per download held the event loop 3-8 ms at each round's start.
        # A round that never closes (its job stopped, a restart) does not record them.
        self.bytes_down = 0

    # ---- queries -------------------------------------------------------------

    @property
    def number(self) -> int:
        return self._number

    @property
    def base(self) -> VersionRow:
        """The version this round trains from."""
        return self._base

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def deadline(self) -> float:
        return self._deadline

    @property
    def selected(self) -> list[str]:
        return list(self._selected)

    @property
    def submitted(self) -> frozenset[str]:
        return frozenset(self._submitted)

    @property
    def contributed(self) -> int:
        """Agents behind the updates delivered: what quorums count (a region's partial
        aggregate counts its contributors, not the region)."""
        return sum(self._contributors.get(member, 1) for member in self._submitted)

    @property
    def accepting(self) -> bool:
        """False once the close has begun: no update joins any more."""
        return self._accepting

    # ---- the runner's side ---------------------------------------------------

    async def restore(self, updates: list[UpdateRow]) -> None:
        """Take in updates recorded before a restart: their files are the durable copy."""
        async with self._lock:
            await asyncio.to_thread(self._restore, updates)

    def _restore(self, updates: list[UpdateRow]) -> None:
        for update in updates:
            if update.agent not in self._submitted and update.path is not None:
                weight = self._provisional(update)
                self._accumulator.fold(weight, TensorFile(Path(update.path)).arrays(),
                                       compression.parse_codec(update.codec))
                self._folded[update.agent] = weight
            self._submitted.add(update.agent)
            self._contributors[update.agent] = update.contributors
            self._codecs[update.agent] = update.codec

    def bound_weights(self, cap: float | None) -> None:
        """The provisional cap on the weight updates are folded in with from now on:
        what the selected agents' Hellos predict the close's cap will be (None: none)."""
        self._provisional_cap = cap if cap is not None and cap > 0 else None

    def _provisional(self, update: UpdateRow) -> float:
        cap = self._provisional_cap
        if cap is None or update.partial:  # a region's weight is exact: it capped its agents' claims
            return float(update.num_examples)
        return min(float(update.num_examples), cap)

    async def reweigh(self, updates: list[UpdateRow], factor: float) -> Weighting:
        """After `close`: cap every folded update's claim at `factor` x the round's median
        claim, folding again (with the difference) each update whose provisional weight
        was not that. Only those updates' files are read."""
        if self._accepting:
            raise RuntimeError(f"round {self._number} is still accepting updates")
        folded = [u for u in updates if u.agent in self._folded]
        result = weighting({u.agent: u.num_examples for u in folded if not u.partial}, factor,
                           exact={u.agent: u.num_examples for u in folded if u.partial})
        async with self._lock:
            await asyncio.to_thread(self._correct, folded, result)
        return result

    def _correct(self, updates: list[UpdateRow], result: Weighting) -> None:
        for update in updates:
            difference = result.weights[update.agent] - self._folded[update.agent]
            if difference and update.path is not None:
                self._accumulator.fold(difference, TensorFile(Path(update.path)).arrays(),
                                       compression.parse_codec(update.codec))
                self._folded[update.agent] += difference

    def next_attempt(self) -> int:
        """Count a new attempt at the round (the first, or a retry after a missed quorum)."""
        self._attempt += 1
        return self._attempt

    def select(self, agents: list[str], deadline: float) -> None:
        """This attempt's agents and deadline, recorded before any task goes out."""
        self._selected = sorted(agents)
        self._deadline = deadline
        self._records.open_round(self._job_id, self._number, self._attempt, self._base.version, self._selected,
                                 deadline)

    def join(self, agent: str, limit: int) -> bool:
        """Whether a (re)connecting agent should get this round's task: it joins the
        selection if it has not answered yet and the round has room (`limit`, 0: any)."""
        if not self._accepting or agent in self._submitted:
            return False
        if agent not in self._selected:
            if limit and len(self._selected) >= limit:
                return False
            self._selected = sorted([*self._selected, agent])
            self._records.set_selected(self._job_id, self._number, self._selected)
        return True

    def drop(self, agent: str) -> None:
        """Take an agent that will not deliver (it declined the task) out of the selection,
        so that the round does not wait for it until the deadline."""
        if agent in self._selected and agent not in self._submitted:
            self._selected = [a for a in self._selected if a != agent]
            self._records.set_selected(self._job_id, self._number, self._selected)
            self._arrived.set()

    def task_codec(self, agent: str, choose: Callable[[str], str]) -> str:
        """The codec of the agent's task: chosen once per round, so a re-sent task keeps
        it and an upload can resume."""
        if agent not in self._codecs:
            self._codecs[agent] = choose(agent)
        return self._codecs[agent]

    async def wait(self) -> None:
        """Return once every selected agent has delivered, or at the deadline."""
        while True:
            self._arrived.clear()
            if set(self._selected) <= self._submitted:
                return
            remaining = self._deadline - time.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return

    async def close(self) -> None:
        """Stop accepting. Once this returns, every acknowledged update is in the sum
        and no other can join: `mean()` and the store's updates are final."""
        async with self._lock:
            self._accepting = False

    def mean(self) -> Mapping[str, np.ndarray]:
        """The example-weighted mean of the folded updates (read lazily), after `close`."""
        if self._accepting:
            raise RuntimeError(f"round {self._number} is still accepting updates")
        return self._accumulator.mean()

    async def release(self) -> None:
        """Free the running sum: spent by the close, or rebuilt from the updates' files
        on the next start. An update may be folding in right now, hence the lock."""
        async with self._lock:
            self._accepting = False  # a released round takes nothing, not even a partial upload to keep
            self._accumulator.close()
        if self._released is not None:
            self._released()

    # ---- the intake's side ---------------------------------------------------

    def admit(self, agent: str, base_version: int, codec: str) -> None:
        """Raise unless this round takes an update from `agent` trained from
        `base_version` and encoded with `codec`."""
        where = f"round {self._number} of job {self._job_id}"
        if not self._accepting:
            raise FailedPrecondition(f"{where} is closing")
        if agent not in self._selected:
            raise FailedPrecondition(f"agent {agent!r} is not selected for {where}")
        if base_version != self._base.version:
            raise FailedPrecondition(
                f"update is based on version {base_version}; round {self._number} trains from version "
                f"{self._base.version}"
            )
        expected = self._codecs.get(agent, self._default_codec)
        if expected is not None and codec != expected:
            raise InvalidArgument(f"codec {codec!r} where the task asked for {expected!r}")

    async def commit(
        self, row: UpdateRow, wire_bytes: int, components: Mapping[str, np.ndarray], codec: Codec,
        phases: Mapping[str, float] | None = None,
    ) -> None:
        """Record the update in the store, fold it into the sum and count it as
        submitted, all under the lock; refused once the close has begun. After it
        returns the update may be acknowledged. `phases`: the update's timings so far
        (cloud.phases), to which the fold's is added."""
        async with self._lock:
            started = time.perf_counter()
            if not self._accepting:
                raise FailedPrecondition(f"round {self._number} closed while the update arrived", reason="stale")
            if row.agent in self._submitted:  # the intake answers re-sends before: never folded twice
                raise AlreadyExists(
                    f"agent {row.agent!r} already has an update in round {self._number} of job {self._job_id}",
                    reason="conflict",
                )
            self._records.add_update(self._job_id, self._number, row, wire_bytes)
            weight = self._provisional(row)
            await asyncio.to_thread(self._accumulator.fold, weight, components, codec)
            self._folded[row.agent] = weight
            self._submitted.add(row.agent)
            self._contributors[row.agent] = row.contributors
            self._codecs[row.agent] = row.codec
            self.clock.arrived(row.agent, {**(phases or {}), "fold": time.perf_counter() - started})
            self._arrived.set()
