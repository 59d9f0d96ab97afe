"""Finding and loading tasks by name: whatever a user's package does wrong ends as one
TaskError saying why (UnknownTask, NOT_FOUND, where nothing of that name is installed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cloud.spec import JobSpec
from tandem import config, tasks
from tandem.errors import InvalidArgument, NotFound


def _module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    _module(tmp_path, "raises_at_import", "raise RuntimeError('boom at import')\n")
    _module(tmp_path, "bad_signature", """
        from tandem.task import Signature, Task
        class T(Task):
            input = Signature((0,))
    """)
    _module(tmp_path, "bad_factory", """
        def factory():
            raise RuntimeError('factory boom')
    """)
    _module(tmp_path, "needs_missing", "import no_such_dependency_xyz\n")
    _module(tmp_path, "bad_build", """
        from tandem.task import Task
        class T(Task):
            def build(self, seed):
                raise ValueError('cannot build')
    """)
    return tmp_path


@pytest.mark.parametrize(("name", "why"), [
    ("raises_at_import:T", "RuntimeError: boom at import"),
    ("bad_signature:T", "every dimension of a signature must be >= 1"),
    ("bad_factory:factory", "RuntimeError: factory boom"),
    ("needs_missing:T", "no_such_dependency_xyz"),
    ("bad_build:T", "cannot build"),
])
def test_a_broken_task_is_one_task_error_saying_why(packages: Path, name: str, why: str) -> None:
    with pytest.raises(tasks.TaskError, match=why) as caught:
        tasks.get(name)
    assert not isinstance(caught.value, tasks.UnknownTask)  # installed, but broken: not NOT_FOUND


def test_a_task_that_is_not_installed_is_unknown(packages: Path) -> None:
    with pytest.raises(tasks.UnknownTask, match="not installed here"):
        tasks.get("no_such_package_xyz.tasks:T")
    with pytest.raises(tasks.UnknownTask, match=r"known: cnn, .*mlp"):
        tasks.get("no-such-task")


def test_a_job_on_a_broken_task_is_invalid_argument_and_on_a_missing_one_not_found(packages: Path) -> None:
    with pytest.raises(InvalidArgument, match="boom at import"):
        JobSpec(model="raises_at_import:T", rounds=1, min_clients=1).validate()
    with pytest.raises(NotFound):
        JobSpec(model="no-such-task", rounds=1, min_clients=1).validate()


@pytest.mark.parametrize(("overrides", "why"), [
    ({"epochs": 0}, "epochs must be in 1..1000"),
    ({"batch_size": "big"}, "batch_size must be an integer"),
    ({"learning_rate": -1.0}, "learning_rate must be in"),
    ({"mu": 1e9}, "mu must be in"),
    ({"epochs": True}, "epochs must be an integer"),
])
def test_config_cannot_bypass_the_training_fields_bounds(overrides: dict[str, config.ConfigValue], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        JobSpec(model="mlp", rounds=1, min_clients=1, config=overrides).validate()


def test_an_updates_metrics_are_kept_within_what_the_coordinator_takes() -> None:
    values: dict[str, object] = {f"m{i:03d}": float(i) for i in range(100)}
    values.update({"x" * 65: 1.0, "nan": float("nan"), "text": "high", "flag": True})
    kept, dropped = config.update_metrics(values)
    assert len(kept) == config.MAX_UPDATE_METRICS and all(len(k) <= config.MAX_METRIC_NAME for k in kept)
    assert {"nan", "text", "flag", "x" * 65} <= set(dropped)
