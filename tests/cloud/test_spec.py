"""A job spec's two forms: the flat wire message and the grouped record. Every field
crosses both ways unchanged, and zero wire fields take the groups' defaults."""

from __future__ import annotations

from cloud.aggregation import Defence
from cloud.spec import JobSpec, LocalTraining, ServerStrategy, Transport
from tandem.v1 import admin_pb2

# Every field away from its default, so that a field dropped or swapped on the way shows.
SPEC = JobSpec(
    model="mlp", rounds=7, min_clients=5, clients_per_round=6, deadline=90.0, eval="digits", seed=11,
    training=LocalTraining(epochs=2, batch_size=16, learning_rate=0.05),
    strategy=ServerStrategy(name="fedprox", mu=0.01, server_lr=0.5),
    transport=Transport(codec="topk:0.1+int8", downlink_codec="int8", target_upload_seconds=3.0,
                        max_update_bytes=1 << 20),
    defence=Defence(aggregator="multi_krum", hostile=1, krum_selected=2, clip_norm=2.0, dp_delta=1e-6),
)


def test_the_wire_form_is_flat_and_round_trips() -> None:
    wire = SPEC.to_proto()
    assert (wire.epochs, wire.strategy, wire.codec, wire.aggregator, wire.hostile_agents) == (
        2, "fedprox", "topk:0.1+int8", "multi_krum", 1)
    assert JobSpec.from_proto(wire) == SPEC


def test_zero_wire_fields_take_the_defaults() -> None:
    spec = JobSpec.from_proto(admin_pb2.JobSpec(model="mlp", rounds=1, min_clients=1))
    assert spec == JobSpec(model="mlp", rounds=1, min_clients=1)
    assert spec.strategy.effective_server_lr(spec.transport.codec) > 0
    assert spec.transport.effective_downlink == "none"


def test_the_record_form_is_grouped_and_round_trips() -> None:
    record = SPEC.to_dict()
    assert record["training"] == {"epochs": 2, "batch_size": 16, "learning_rate": 0.05}
    assert record["strategy"]["name"] == "fedprox" and record["defence"]["hostile"] == 1
    assert JobSpec.from_dict(record) == SPEC
