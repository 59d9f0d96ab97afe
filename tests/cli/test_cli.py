"""The `tandem` command: help for every subcommand, and `certs` end to end through main();
and the lab's (`python -m tandem_lab`), which holds the benchmarks and the GPU check."""

from __future__ import annotations

import argparse
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tandem_cli.main import build_parser, main
from tandem_lab import main as lab


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path in the parser tree, e.g. ("certs", "init"), found from the parser itself."""
    paths: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_subcommands(sub, (*prefix, name)))
    return paths


SUBCOMMANDS = _subcommands(build_parser())
LAB_SUBCOMMANDS = _subcommands(lab.build_parser())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.process
def test_top_level_help_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandem_cli", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tandem")
    for command in ("certs", "cloud", "edge", "job", "agents", "models", "demo"):
        assert command in result.stdout


def test_subcommand_tree_is_complete() -> None:
    assert {("certs", "init"), ("certs", "add-agent"), ("cloud",), ("edge",), ("job", "start"), ("job", "wait"),
            ("job", "list"), ("agents",), ("models",), ("demo",), ("status",), ("serve",), ("infer",)} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("path", [(), *SUBCOMMANDS], ids=lambda p: " ".join(p) or "tandem")
def test_help_exits_zero(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('tandem', *path))}")


@pytest.mark.process
def test_lab_help_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandem_lab", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m tandem_lab")
    for command in ("bench", "gpu-check"):
        assert command in result.stdout


def test_benchmarks_are_lab_commands_not_tandem_commands() -> None:
    assert {("bench", "fl"), ("bench", "auto"), ("bench", "infer"), ("gpu-check",)} <= set(LAB_SUBCOMMANDS)
    assert not {path[0] for path in SUBCOMMANDS} & {"bench", "gpu-check"}


@pytest.mark.parametrize("path", [(), *LAB_SUBCOMMANDS], ids=lambda p: " ".join(p) or "lab")
def test_lab_help_exits_zero(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        lab.main([*path, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(('python -m tandem_lab', *path))}")


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: tandem" in capsys.readouterr().err


def test_certs_init_and_add_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(d), "--agents", "a,b"]) == 0
    assert "2 agent certificates" in capsys.readouterr().out
    for stem in ("ca", "cloud", "admin", "agents/a", "agents/b"):
        assert _mode(d / f"{stem}.pem") == 0o644, stem
        assert _mode(d / f"{stem}.key") == 0o600, stem
    ca = (d / "ca.pem").read_bytes(), (d / "ca.key").read_bytes()

    # A second init refuses and leaves the deployment alone.
    assert main(["certs", "init", "--dir", str(d), "--agents", "x"]) == 2
    captured = capsys.readouterr()
    assert "already exists" in captured.err and "ca.pem" in captured.err
    assert captured.out == ""
    assert ((d / "ca.pem").read_bytes(), (d / "ca.key").read_bytes()) == ca
    assert not (d / "agents" / "x.pem").exists()

    assert main(["certs", "add-agent", "c", "--dir", str(d)]) == 0
    assert str(d / "agents" / "c.pem") in capsys.readouterr().out
    assert _mode(d / "agents" / "c.key") == 0o600
    assert _mode(d / "agents" / "c.pem") == 0o644

    assert main(["certs", "add-agent", "c", "--dir", str(d)]) == 2
    assert "already exists" in capsys.readouterr().err


BAD_NAMES = ["Bad", "a/b", "_lead", "a b", "x" * 64]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    assert main(["certs", "init", "--dir", str(d), "--agents", "ok"]) == 0
    return d


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_agent_name_in_init_exits_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(d), "--agents", f"ok,{name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid name") and repr(name) in err
    assert not (d / "ca.pem").exists()  # names are checked before anything is written


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_agent_name_in_add_agent_exits_2(name: str, deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted((deployment / "agents").iterdir())
    assert main(["certs", "add-agent", name, "--dir", str(deployment)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid name") and repr(name) in err
    assert sorted((deployment / "agents").iterdir()) == before


def test_add_agent_without_a_deployment_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "add-agent", "c", "--dir", str(tmp_path)]) == 2
    assert "tandem certs init" in capsys.readouterr().err


def test_certs_commands_default_to_where_every_other_command_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tandem certs init` without --dir writes .certs (or $TANDEM_CERTS), which `tandem
    cloud`, `tandem edge` and the admin commands read by default; --dir was required."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TANDEM_CERTS", raising=False)
    assert main(["certs", "init", "--agents", "edge-1"]) == 0
    assert (tmp_path / ".certs" / "ca.pem").exists() and (tmp_path / ".certs" / "agents" / "edge-1.pem").exists()
    assert main(["certs", "add-agent", "edge-2"]) == 0
    assert (tmp_path / ".certs" / "agents" / "edge-2.pem").exists()
    monkeypatch.setenv("TANDEM_CERTS", str(tmp_path / "elsewhere"))
    assert main(["certs", "init"]) == 0
    assert (tmp_path / "elsewhere" / "ca.pem").exists()


def test_readme_configuration_reference_matches_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem_cli import docs

    for var in docs.ENVIRONMENT:  # defaults come from the environment; the README shows the built-in ones
        monkeypatch.delenv(var, raising=False)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert docs.splice(readme) == readme, "run `python -m tandem_cli.docs README.md`"
    assert "| `--placement` MODEL=MODE |" in readme and "#### `tandem serve`" in readme


def test_a_finished_job_never_shows_a_round_past_its_last() -> None:
    from tandem_cli.admin import round_progress

    assert round_progress({"current_round": 11, "spec": {"rounds": 10}}) == "round 10/10"  # completed: 11 on the wire
    assert round_progress({"current_round": 3, "spec": {"rounds": 10}}) == "round 3/10"


@pytest.mark.parametrize(("command", "flags", "why"), [
    ("cloud", ["--inline-below-ms", "-1"], "--inline-below-ms must be >= 0"),
    ("cloud", ["--torch-threads", "-2"], "--torch-threads must be >= 0"),
    ("cloud", ["--confirm-ticks", "0"], "--confirm-ticks must be at least 1"),
    ("cloud", ["--min-dwell", "-1"], "--min-dwell must be >= 0"),
    ("edge", ["--inline-below-ms", "-1"], "--inline-below-ms must be >= 0"),
    ("edge", ["--torch-threads", "-2"], "--torch-threads must be >= 0"),
])
def test_serving_and_placement_numbers_out_of_range_are_one_line_and_exit_2(
        deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, flags: list[str],
        why: str) -> None:
    where = ["--state", str(tmp_path / "state")] if command == "cloud" else \
        ["--id", "ok", "--cloud", "localhost:1", "--data", "digits:0/2"]
    assert main([command, "--certs", str(deployment), *where, *flags]) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err, err


def test_enrollment_commands_refuse_wrong_inputs_in_one_line(
        deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("t")

    def refused(args: list[str], why: str) -> None:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {why}") and len(err.strip().splitlines()) == 1, err

    # A malformed --enroll is found before the agent writes a key or calls anything.
    refused(["edge", "--certs", str(tmp_path / "agent"), "--id", "a", "--cloud", "localhost:1", "--data",
             "digits:0/2", "--enroll", "nohost", "--enroll-token-file", str(token), "--ca-file",
             str(deployment / "ca.pem")], "--enroll 'nohost': expected HOST:PORT")
    assert not (tmp_path / "agent").exists()
    assert main(["certs", "intermediate", "--dir", str(deployment), "--out", str(tmp_path / "ca")]) == 0
    capsys.readouterr()
    refused(["certs", "token", "a", "--ca-dir", str(tmp_path / "ca"), "--state", str(tmp_path / "none")],
            f"--state {tmp_path / 'none'}: no such directory")
    refused(["certs", "revoke", "a", "--dir", str(deployment), "--ca-dir", str(tmp_path / "none")],
            f"--ca-dir {tmp_path / 'none'}: no enrollment service's directory there")
    refused(["certs", "revoke", "never-issued", "--dir", str(deployment)],
            "no agent or client named 'never-issued'")
    refused(["certs", "rotate", "--dir", str(deployment), "--days", "0"], "certificate lifetime must be at least 1 day")
    # An enrolled agent's name is not in --dir: with --ca-dir it is taken for an agent, and denied in both.
    assert main(["certs", "revoke", "enrolled-1", "--dir", str(deployment), "--ca-dir", str(tmp_path / "ca")]) == 0
    assert "agent/enrolled-1" in (deployment / "revoked.txt").read_text()
    assert "agent/enrolled-1" in (tmp_path / "ca" / "revoked.txt").read_text()


def test_region_refuses_wrong_inputs_in_one_line_before_writing_state(
        deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"

    def refused(flags: list[str], why: str) -> None:
        assert main(["region", "--certs", str(deployment), "--state", str(state), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {why}") and len(err.strip().splitlines()) == 1, err
        assert not state.exists()

    ok = ["--parent", "localhost:7443", "--id", "west"]
    refused(["--parent", "localhost", "--id", "west"], "--parent 'localhost' is not HOST:PORT")
    refused(["--parent", "localhost:0", "--id", "west"], "--parent 'localhost:0' is not HOST:PORT")
    refused(["--parent", "localhost:7443", "--id", "Bad Name"], "invalid name 'Bad Name'")
    refused(ok, f"no {deployment / 'regions' / 'west.pem'}: run `tandem certs add-region west --dir {deployment}`")
    assert main(["certs", "add-region", "west", "--dir", str(deployment)]) == 0
    capsys.readouterr()
    refused([*ok, "--min-clients", "0"], "--min-clients must be at least 1, got 0")
    refused([*ok, "--min-clients", "3", "--clients-per-round", "2"],
            "--clients-per-round (2) must be 0 (all) or at least --min-clients (3)")
    refused([*ok, "--tasks", " , "], "--tasks ' , ': expected comma-separated task names")


def test_edge_refuses_a_fallback_that_is_not_an_address(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edge", "--certs", str(deployment), "--id", "ok", "--cloud", "localhost:1", "--data", "digits:0/2",
                 "--fallback", "nohost"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fallback 'nohost' is not HOST:PORT") and len(err.strip().splitlines()) == 1, err
