"""The traffic application end to end, small (issue 17): real SUMO, a real coordinator
and two district agents as processes, a federated job, every planning strategy on a
held-out day with district 0's link cut through a relay. `make traffic` runs it full."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tandem_example_traffic.bench import STRATEGIES


@pytest.mark.slow
@pytest.mark.process
def test_a_short_run_plans_every_strategy_and_loses_no_request_during_the_cut(tmp_path: Path) -> None:
    out = tmp_path / "traffic.json"
    done = subprocess.run(
        [sys.executable, "-m", "tandem_example_traffic.bench", "--districts", "2", "--days", "2", "--minutes", "20",
         "--rounds", "2", "--epochs", "1", "--planning-days", "1", "--out", str(out), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    planning = result["planning"]
    assert list(planning) == list(STRATEGIES)
    for name, summary in planning.items():
        assert summary["all"]["vehicles"] > 0, name
        assert summary["requests"] > 0 or name == "no_guidance", name
    # The edge always answers; the cloud cannot be reached from the cut district.
    assert planning["collaborative"]["failed_requests_during_cut"] == 0
    assert planning["edge"]["failed_requests"] == 0
    assert planning["cloud"]["failed_requests_during_cut"] > 0
    assert result["targets"]["failed_route_requests_during_cut"]["met"]
    # The district agents answered every forecast (locally: their placement is edge).
    assert planning["collaborative"]["inference_failures"] == 0
    regimes = result["forecast"]["regimes"]
    assert set(regimes) == {"last_value", "historical_average", "local", "central", "federated"}
    assert all(r["mae_1min"] > 0 for r in regimes.values())
    assert set(result["targets"]) == {"travel_time_vs_oracle", "travel_time_vs_free_flow",
                                      "travel_time_vs_best_single", "forecast_mae_vs_central",
                                      "forecast_mae_vs_local", "failed_route_requests_during_cut"}
    assert out.with_suffix(".png").exists() or "matplotlib is not installed" in done.stderr


@pytest.mark.process
@pytest.mark.parametrize(("flags", "why"), [(["--districts", "0"], "--districts must be at least 1"),
                                             (["--minutes", "5"], "--minutes must be at least 20"),
                                             (["--connected-share", "2"], "--connected-share must be between 0 and 1"),
                                             (["--network", "nope"], "invalid choice: 'nope'")])
def test_wrong_options_are_one_line_and_exit_2(flags: list[str], why: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tandem_example_traffic.bench", *flags], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and why in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.process
@pytest.mark.parametrize(("flags", "why"), [(["--variants", "oracle,nope"], "unknown variants ['nope']"),
                                             (["--days", "1"], "--days must be at least 2")])
def test_the_ablation_refuses_wrong_options_in_one_line(flags: list[str], why: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tandem_example_traffic.ablation", *flags], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and why in done.stderr and "Traceback" not in done.stderr, done.stderr
