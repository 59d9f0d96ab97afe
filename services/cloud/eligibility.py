"""Which connected agents may train a job: those its selection names (label selectors,
agent names) that offer its task ready, with the coordinator's fingerprint.

An agent that matches the selection but cannot train the task is excluded from the
job, once, with a code and a reason (recorded in the store, shown in `tandem job
status`, logged once), and never selected for it; the job goes on with the others.
"""

from __future__ import annotations

import logging

from cloud.spec import JobSpec
from cloud.store import Store
from tandem import config, tasks, zoo
from tandem.certs import REGION_PREFIX
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

NOT_FOUND = "NOT_FOUND"
FAILED_PRECONDITION = "FAILED_PRECONDITION"


def offer_problem(agent: str, hello: pb.Hello, task: str, fingerprint: str) -> tuple[str, str] | None:
    """(code, reason) why `agent` cannot train `task`, per its Hello; None if it can.

    An agent that offers no task at all is older than offers: it trains the zoo's."""
    offers = {offer.name: offer for offer in hello.tasks}
    if not offers:
        if task in zoo.NAMES:
            return None
        return NOT_FOUND, (f"agent {agent} does not offer task {task}: it offers no tasks (an agent older than "
                           "task offers trains only the built-in zoo)")
    offer = offers.get(task)
    if offer is None:
        return NOT_FOUND, f"agent {agent} does not offer task {task}: not installed there or not in its --tasks"
    if not offer.ready and not offer.fingerprint:  # named in its --tasks, but it does not load there
        return FAILED_PRECONDITION, f"agent {agent} cannot load task {task}: {offer.reason or 'no reason given'}"
    if offer.fingerprint != fingerprint:
        return FAILED_PRECONDITION, (f"agent {agent} has task {task} fingerprint {offer.fingerprint or '(none)'}, "
                                     f"the coordinator {fingerprint} (another version of the package?)")
    if not offer.ready:
        return FAILED_PRECONDITION, f"agent {agent}'s data does not fit {task}: {offer.reason or 'no reason given'}"
    return None


class Eligibility:
    """One job's view of the connected agents: selected by its spec, able to train its task."""

    def __init__(self, job_id: str, spec: JobSpec, store: Store) -> None:
        self._job_id, self._spec, self._store = job_id, spec, store
        self._selectors = config.parse_labels(spec.selection.select, "select")
        self._names = frozenset(spec.selection.agents)
        self._excluded = {e.agent for e in store.exclusions(job_id)}

    @property
    def fingerprint(self) -> str:
        return tasks.get(self._spec.model).fingerprint  # loaded at the job's start; cached

    def selects(self, agent: str, hello: pb.Hello) -> bool:
        """Whether the job's selection names the agent (its labels, its name)."""
        return (not self._names or agent in self._names) and config.matches(hello.labels, self._selectors)

    def eligible(self, agent: str, hello: pb.Hello) -> bool:
        """Whether the job may select the agent now; an agent that is selected but cannot
        train the task is excluded (recorded once)."""
        if agent in self._excluded or not self.selects(agent, hello):
            return False
        problem = offer_problem(agent, hello, self._spec.model, self.fingerprint)
        if problem is None and agent.startswith(REGION_PREFIX) and self._spec.defence.partials_refused:
            problem = FAILED_PRECONDITION, f"{agent} sends partial aggregates: {self._spec.defence.partials_refused}"
        if problem is None:
            return True
        self.exclude(agent, *problem)
        return False

    def exclude(self, agent: str, code: str, reason: str) -> None:
        """Never select `agent` for this job again; recorded and logged the first time."""
        if agent in self._excluded:
            return
        self._excluded.add(agent)
        if self._store.exclude(self._job_id, agent, code, reason):
            log.warning("job %s excludes agent %s: %s %s", self._job_id, agent, code, reason)
