"""`make bench-scale` at a tiny size (tandem_lab.bench_scale): a real cloud, two real
regions and a fleet process of light agents, flat against hierarchical, and a region
killed mid-round; the equality check with real agent processes is left out here
(`--real-agents 0`: it takes a minute of its own). The full-size figures are in
bench/README.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tandem_lab.bench_scale import parse_args, run
from tandem_lab.scale_report import SKIPPED

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.process]


async def test_a_tiny_bench_scale_writes_every_named_target(tmp_path: Path) -> None:
    args = parse_args(["--agents", "20", "--regions", "2", "--selected", "4", "--rounds", "2", "--fleets", "1",
                       "--idle-seconds", "1", "--settle-seconds", "0", "--real-agents", "0", "--kill-agents", "2",
                       "--heartbeat", "1", "--probe-interval", "0.25", "--out", str(tmp_path / "scale.json")])
    result = json.loads(json.dumps(await run(args)))  # what main writes
    targets = result["targets"]
    assert set(SKIPPED) <= set(targets)
    assert targets["model_max_abs_diff_vs_flat"]["skipped"] == "--real-agents 0"
    for name in set(SKIPPED) - {"model_max_abs_diff_vs_flat"}:
        assert targets[name]["measured"] is not None and math.isfinite(targets[name]["measured"]), (
            name, targets[name], result["hierarchical"]["tiers"])
    # Two regions' partials against four agents' updates: half the bytes, whatever the machine.
    assert targets["cloud_bytes_per_round_vs_flat"]["measured"] == pytest.approx(0.5, rel=0.05)
    assert targets["dropped_streams"]["measured"] == 0
    assert targets["acked_updates_lost_region_kill"]["met"], result["real"]["region_kill"]
    assert targets["region_kill_job_completed"]["met"], result["real"]["region_kill"]
    tree = result["hierarchical"]
    assert tree["tiers"]["agents_to_region"]["job"]["heartbeats"] + tree["tiers"]["agents_to_region"]["idle"][
        "heartbeats"] > 0
    assert tree["uploads"] == {"OK": 4 * 2}
