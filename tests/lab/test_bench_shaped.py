"""`bench fl --rate --rtt`: the options are parsed and refused in one line (exit 2) before anything starts."""

from __future__ import annotations

import pytest

from tandem_lab import bench_shaped
from tandem_lab.bench import flower_targets, summarise
from tandem_lab.bench_shaped import check_rate, parse_rtt, refusal
from tandem_lab.main import main


def test_rtt_and_rate_are_parsed() -> None:
    assert parse_rtt("40ms") == pytest.approx(0.04) and parse_rtt("0.5s") == 0.5 and parse_rtt("0ms") == 0.0
    assert check_rate("20mbit") == 20e6 and check_rate("512kbit") == 512e3 and check_rate("1.5gbit") == 1.5e9
    for bad in ("40", "40 ms", "-1ms", "fast", "11s"):
        with pytest.raises(ValueError, match="--rtt"):
            parse_rtt(bad)
    for bad in ("20mbps", "20", "mbit", "0mbit", "-5mbit", "20Mbit", "1e3kbit", "nanmbit"):
        with pytest.raises(ValueError, match="--rate"):
            check_rate(bad)


def test_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_shaped, "unavailable_reason", lambda: None)
    assert refusal(None, None, 8) is None and refusal("20mbit", "40ms", 8) is None and refusal("20mbit", None, 8) is None
    assert "needs --rate" in str(refusal(None, "40ms", 8))
    assert "--clients" in str(refusal("20mbit", "40ms", 200))
    monkeypatch.setattr(bench_shaped, "unavailable_reason", lambda: "needs root for ip netns and tc")
    assert refusal("20mbit", "40ms", 8) == "needs root for ip netns and tc"
    assert refusal(None, None, 8) is None  # unshaped runs need no root


@pytest.mark.parametrize(("flags", "said"), [
    (["--rate", "20mbps", "--rtt", "40ms"], "--rate '20mbps'"),
    (["--rate", "20mbit", "--rtt", "forty"], "--rtt 'forty'"),
    (["--rtt", "40ms"], "needs --rate"),
    (["--rate", "20mbit", "--rtt", "40ms"], "needs root"),
])
def test_the_command_refuses_in_one_line_with_exit_2(
    flags: list[str], said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_shaped.os, "geteuid", lambda: 1000)  # not root, whoever runs the tests

    def never(*args: object) -> object:
        raise AssertionError("the benchmark started")

    monkeypatch.setattr("tandem_lab.bench.run_bench_fl", never)
    assert main(["bench", "fl", *flags, "--out", "/nonexistent/fl.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1


def test_shaped_targets_hold_compressed_codecs_to_a_third_of_flower() -> None:
    rounds = [{"seconds": s, "accuracy": 0.9, "bytes_up": 10, "bytes_down": 20} for s in (0.5, 0.5)]
    run = {"codec": "x", "rounds": rounds, "train_seconds_by_agent": [0.2], "model_transfer_seconds": 0.1,
           "wire_bytes_up": 1, "wire_bytes_down": 1}
    summary = {"none": summarise(run, 2, 1000), "topk:0.01+int8": summarise(run, 2, 1000)}
    lines = flower_targets(summary, {"flwr": "1.42.0", "round_seconds": [2.0, 1.0]}, {"rate": "20mbit", "rtt": "40ms"})
    sparse = lines["seconds_per_round_vs_flower_shaped[topk:0.01+int8]"]
    assert sparse["measured"] == pytest.approx(0.5 / 1.5) and sparse["goal"] == 0.3 and not sparse["met"]
    assert lines["seconds_per_round_vs_flower_shaped[none]"]["goal"] == 1.0
    assert "20mbit" in sparse["how"] and "40ms" in sparse["how"]
    assert "seconds_per_round_vs_flower[none]" in flower_targets(summary, {"round_seconds": [1.0]})
