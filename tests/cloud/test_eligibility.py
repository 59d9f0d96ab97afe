"""Which agents may train a job, the codes of those excluded, and a job spec's task checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.eligibility import Eligibility, offer_problem
from cloud.spec import JobSpec, Selection
from cloud.store import Store
from tandem import tasks
from tandem.errors import InvalidArgument, NotFound
from tandem.v1 import admin_pb2
from tandem.v1 import coordinator_pb2 as pb

MLP = tasks.get("mlp").fingerprint


def _hello(*offers: pb.TaskOffer, **labels: str) -> pb.Hello:
    return pb.Hello(num_examples=10, tasks=offers, labels=labels)


def test_offer_problems_name_the_agent_the_task_and_why() -> None:
    assert offer_problem("a", _hello(pb.TaskOffer(name="mlp", fingerprint=MLP, ready=True)), "mlp", MLP) is None
    assert offer_problem("a", _hello(), "mlp", MLP) is None  # an agent older than offers trains the zoo
    code, reason = offer_problem("a", _hello(), "pkg.mod:T", "f") or ("", "")
    assert code == "NOT_FOUND"
    code, reason = offer_problem("a", _hello(pb.TaskOffer(name="cnn", ready=True)), "mlp", MLP) or ("", "")
    assert code == "NOT_FOUND" and "agent a does not offer task mlp" in reason
    code, reason = offer_problem("a", _hello(pb.TaskOffer(name="mlp", fingerprint="0" * 16, ready=True)),
                                 "mlp", MLP) or ("", "")
    assert code == "FAILED_PRECONDITION" and "0" * 16 in reason and MLP in reason
    code, reason = offer_problem("a", _hello(pb.TaskOffer(name="mlp", fingerprint=MLP, reason="shape [3]")),
                                 "mlp", MLP) or ("", "")
    assert code == "FAILED_PRECONDITION" and "data does not fit mlp: shape [3]" in reason


def test_exclusions_are_recorded_once_and_selection_is_not_an_exclusion(tmp_path: Path) -> None:
    store = Store(tmp_path)
    spec = JobSpec(model="mlp", rounds=1, min_clients=1, selection=Selection(select=("site=a",)))
    store.create_job("job", spec.to_dict(), 1)
    eligibility = Eligibility("job", spec, store)
    good = _hello(pb.TaskOffer(name="mlp", fingerprint=MLP, ready=True), site="a")
    assert eligibility.eligible("agent-0", good)
    assert not eligibility.eligible("agent-1", _hello(pb.TaskOffer(name="mlp", fingerprint=MLP, ready=True)))
    wrong = _hello(pb.TaskOffer(name="mlp", fingerprint="1" * 16, ready=True), site="a")
    assert not eligibility.eligible("agent-2", wrong)
    assert not eligibility.eligible("agent-2", good)  # never selected for the job again
    assert [(e.agent, e.code) for e in store.exclusions("job")] == [("agent-2", "FAILED_PRECONDITION")]
    assert not Eligibility("job", spec, store).eligible("agent-2", good)  # after a restart too
    store.close()


def test_a_job_spec_checks_its_task_config_and_selection() -> None:
    with pytest.raises(NotFound, match="known: .*mlp"):
        JobSpec(model="no-such-task", rounds=1, min_clients=1).validate()
    with pytest.raises(InvalidArgument, match="cannot be loaded"):
        JobSpec(model="tandem.zoo:NOT_THERE", rounds=1, min_clients=1).validate()
    with pytest.raises(InvalidArgument, match="config key"):
        JobSpec(model="mlp", rounds=1, min_clients=1, config={"bad key": 1}).validate()
    with pytest.raises(InvalidArgument, match="select"):
        JobSpec(model="mlp", rounds=1, min_clients=1, selection=Selection(select=("nolabel",))).validate()
    spec = JobSpec(model="mlp", rounds=1, min_clients=1, config={"epochs": 2, "marker": "x"},
                   selection=Selection(select=("site=a",), agents=("agent-0",)))
    assert JobSpec.from_proto(spec.to_proto()) == spec
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert spec.task_config() == {"epochs": 2, "batch_size": 32, "learning_rate": 0.1, "mu": 0.0, "marker": "x"}
    wire = admin_pb2.JobSpec(model="mlp", rounds=1, min_clients=1)
    wire.config["x"].CopyFrom(pb.ConfigValue())  # a value with nothing set
    with pytest.raises(InvalidArgument, match="no value"):
        JobSpec.from_proto(wire)
