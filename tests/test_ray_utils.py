"""What a job's driver does with Ray before any work, without starting Ray: the runtime env
it passes to ``ray.init`` (never a key the submitted job's runtime env sets: Ray refuses to
merge those), and the output folders it refuses (one the job's temporary working dir would
swallow; a local one on several nodes)."""
from __future__ import annotations

import json
import pathlib

import pytest

from pipeline import ray_utils
from pipeline.cli import run_step
from pipeline.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")


def as_job(monkeypatch: pytest.MonkeyPatch, env_vars: dict[str, str]) -> None:
    """This process as the driver of a job submitted with ``env_vars`` in its runtime env."""
    job = {"runtime_env": {"env_vars": env_vars, "working_dir": "gcs://_ray_pkg_x.zip"}}
    monkeypatch.setenv(ray_utils.JOB_CONFIG_ENV, json.dumps(job))
    for key, value in env_vars.items():
        monkeypatch.setenv(key, value)


def test_ray_init_env_leaves_out_what_the_job_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_utils.JOB_CONFIG_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    outside = ray_utils.worker_env_vars()
    assert {"HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"} <= set(outside)
    assert not ray_utils.in_ray_job()

    runtime_env = yaml_env_vars(REPO / "cluster" / "runtime_env.yaml")
    as_job(monkeypatch, runtime_env)
    inside = ray_utils.worker_env_vars()
    assert ray_utils.in_ray_job()
    assert not set(inside) & set(runtime_env), inside
    assert ray_utils.job_env_vars() == runtime_env


def yaml_env_vars(path: pathlib.Path) -> dict[str, str]:
    import yaml

    return yaml.safe_load(path.read_text())["env_vars"]


@pytest.mark.parametrize("root", ["", "runs/x"])
def test_a_job_refuses_an_output_root_inside_its_working_dir(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, root: str) -> None:
    as_job(monkeypatch, {})
    with pytest.raises(SystemExit) as exit_info:
        run_step(["--config", DEMO, f"output_root={root}"], "prepare_data")
    assert exit_info.value.code == 2
    assert "temporary copy of the job's working dir" in capsys.readouterr().err


def test_a_local_output_root_needs_one_node_or_a_shared_mount(tmp_path: pathlib.Path) -> None:
    one, two = [{"NodeID": "a", "Alive": True}], [{"NodeID": "a"}, {"NodeID": "b"}]
    local = load_config(DEMO, [f"output_root={tmp_path}"])
    ray_utils.check_output_root(local, one)
    with pytest.raises(ConfigError, match="2 nodes: the workers cannot see the driver's disk"):
        ray_utils.check_output_root(local, two)
    shared = load_config(DEMO, [f"output_root={tmp_path}", "storage.shared_filesystem=true"])
    ray_utils.check_output_root(shared, two)
    ray_utils.check_output_root(load_config(DEMO, ["output_root=s3://bucket/run"]), two)


# ---------------------------------------------------------------------------------------
# Bounded retries (the fault matrix: a deterministic failure ends the job, README Reliability)


def _count_attempt(folder: str) -> int:
    import os
    import uuid

    pathlib.Path(folder, uuid.uuid4().hex).touch()
    return len(os.listdir(folder))


def _unloadable(folder: str) -> None:
    """What unpickling the task below runs: count the attempt, then fail as a task argument
    that does not deserialise does (the RowError hang of issue 17)."""
    _count_attempt(folder)
    raise TypeError("RowError.__init__() missing 2 required positional arguments")


class UnloadableTask:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __reduce__(self):
        return _unloadable, (self.folder,)


def _die(task: dict) -> dict:
    _count_attempt(task["folder"])
    import os

    os._exit(1)  # the worker process dies: a system failure, which Ray retries


@pytest.mark.integration
@pytest.mark.reliability
def test_a_task_that_cannot_load_and_a_dying_worker_are_retried_a_bounded_number_of_times(
        ray_local, tmp_path: pathlib.Path) -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.get_config(ray_utils.TASK_RETRIES_KEY, ray_utils.DEFAULT_TASK_RETRIES)
    context.set_config(ray_utils.TASK_RETRIES_KEY, 1)
    try:
        unloadable, dying = tmp_path / "unloadable", tmp_path / "dying"
        unloadable.mkdir()
        dying.mkdir()
        with pytest.raises(Exception, match="missing 2 required positional arguments"):
            ray_utils.run_shard_tasks([UnloadableTask(str(unloadable))], lambda task: {})
        # A RaySystemError (Ray Data retries those): 1 + ray.max_task_retries=1, not for ever.
        assert len(list(unloadable.iterdir())) == 2
        with pytest.raises(Exception) as err:
            ray_utils.run_shard_tasks([{"folder": str(dying)}], _die)
        assert len(list(dying.iterdir())) == 2, err.value  # 1 + ray.max_task_retries=1
    finally:
        context.set_config(ray_utils.TASK_RETRIES_KEY, before)
