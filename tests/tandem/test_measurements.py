"""Heartbeat measurement names: what the edge builds, the cloud parses back."""

from __future__ import annotations

import pytest

from tandem import measurements as names


@pytest.mark.parametrize(
    "record",
    [names.StageSeconds("cnn", 3), names.ExamplesPerSecond("mlp-small"), names.ConfidenceBelow("cnn", 0.95),
     names.StageSeconds("ns:model", 12), names.ConfidenceBelow("a:b", 1.0)],
)
def test_a_built_name_parses_back(record: names.PerModel) -> None:
    assert names.parse(record.key) == record


def test_names_on_the_wire() -> None:
    assert names.StageSeconds("cnn", 1).key == "stage_seconds:cnn:1"
    assert names.ExamplesPerSecond("cnn").key == "examples_per_second:cnn"
    assert names.ConfidenceBelow("cnn", 0.9).key == "confidence_below:cnn:0.9"
    assert names.link_bytes_per_second("up") == names.LINK_UP_BYTES_PER_SECOND == "link_up_bytes_per_second"


@pytest.mark.parametrize(
    "name", ["rtt_seconds", "link_up", "stage_seconds:cnn:x", "stage_seconds:cnn:\u00b2", "confidence_below:cnn:x", ""]
)
def test_other_and_malformed_names_are_not_records(name: str) -> None:
    assert names.parse(name) is None
