"""An agent's offers and its training step with a user's task: only the federated
tensors leave it, its counters and local tensors stay and persist across rounds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge.offers import Offers
from edge.trainer import Trainer
from tandem import config, tasks
from tandem.transfer import HeldVersion
from tandem.v1 import coordinator_pb2 as pb

SUPPORT = Path(__file__).resolve().parents[1] / "support"
TASK = "tandem_testtask:Regression"


@pytest.fixture
def regression(monkeypatch: pytest.MonkeyPatch) -> tasks.LoadedTask:
    monkeypatch.syspath_prepend(str(SUPPORT / "tasks_v1"))
    return tasks.get(TASK)


def test_offers_say_what_is_ready_and_why_not(regression: tasks.LoadedTask) -> None:
    offers = Offers.prepare([TASK, "mlp"], "regression:0/2")
    by_name = {o.name: o for o in offers.offers()}
    assert by_name[TASK].ready and by_name[TASK].fingerprint == regression.fingerprint
    assert not by_name["mlp"].ready and "load_data" in by_name["mlp"].reason
    assert offers.num_examples == 600
    with pytest.raises(tasks.UnknownTask):
        Offers.prepare(["no-such-task"], "digits:0/2")


async def test_only_federated_tensors_leave_and_counters_persist(regression: tasks.LoadedTask) -> None:
    offers = Offers.prepare([TASK], "regression:0/2")
    trainer = Trainer(lambda: offers, 0, lambda: None, asyncio.Event(), (0.1, 0.1), lambda: None)  # type: ignore[arg-type,return-value]
    base = regression.state_arrays(regression.build(0))
    task = pb.TrainTask(job_id="job", round=1, model=TASK, task_fingerprint=regression.fingerprint)
    config.to_proto({"epochs": 1, "batch_size": 100, "learning_rate": 0.01, "marker": 3}, task.config)
    delta, loss, _ = await trainer.train(task, HeldVersion(0, "", base))
    assert set(delta) == set(regression.specs) and loss > 0
    assert not any(name.endswith("num_batches_tracked") for name in delta)
    assert trainer._results[("job", 1)][0]["marker_seen"] == 3  # noqa: SLF001 - what the header will carry
    counter = "1.num_batches_tracked"
    assert regression.local_keys == [counter]
    assert int(trainer._local["job"][1][counter]) == 6  # noqa: SLF001
    task.round = 2
    await trainer.train(task, HeldVersion(0, "", base))
    assert int(trainer._local["job"][1][counter]) == 12  # noqa: SLF001 - kept on the device, across rounds
