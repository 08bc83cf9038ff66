"""pipeline.submit (jobs/submit.py): ids, attempts, refusals and what is submitted, against a
fake JobSubmissionClient (no Ray)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from ray.job_submission import JobStatus

from pipeline import outputs, provenance, storage, submit
from pipeline.config import Config, load_config
from pipeline.steps import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "jobs", "configs", "demo.yaml")
RUNTIME_ENV = os.path.join(REPO, "cluster", "runtime_env.yaml")

pytestmark = pytest.mark.usefixtures("storage_env")


class FakeClient:
    """Records ``submit_job``; the cluster's jobs are ``jobs`` (id -> status); a followed job
    yields ``logs`` then ends FAILED if its id names a step of ``failing``, else SUCCEEDED."""

    def __init__(self, jobs: dict[str, JobStatus] | None = None,
                 failing: Iterable[str] = (), logs: Iterable[str] = ("log line\n",)) -> None:
        self.jobs = dict(jobs or {})
        self.failing = set(failing)
        self.logs = tuple(logs)
        self.submitted: list[dict[str, Any]] = []
        self.address: str | None = None

    def list_jobs(self) -> list[SimpleNamespace]:
        driver = SimpleNamespace(submission_id=None, status=JobStatus.SUCCEEDED, message="")
        return [driver, *(SimpleNamespace(submission_id=job_id, status=status, start_time=0,
                                          message="") for job_id, status in self.jobs.items())]

    def submit_job(self, *, entrypoint: str, submission_id: str,
                   runtime_env: dict[str, Any]) -> str:
        assert submission_id not in self.jobs, f"{submission_id} submitted twice"
        self.submitted.append({"entrypoint": entrypoint, "submission_id": submission_id,
                               "runtime_env": runtime_env})
        self.jobs[submission_id] = JobStatus.PENDING
        return submission_id

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        for line in self.logs:
            yield f"[{job_id}] {line}"
        failed = any(f"-{step}-" in job_id for step in self.failing)
        self.jobs[job_id] = JobStatus.FAILED if failed else JobStatus.SUCCEEDED

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        return SimpleNamespace(status=self.jobs[job_id], message="boom: CUDA out of memory")

    def ids(self) -> list[str]:
        return [call["submission_id"] for call in self.submitted]


def config(root: Path, *overrides: str) -> Config:
    return load_config(DEMO, [f"output_root={root}", *overrides])


def run(client: FakeClient, step: str, root: Path, *args: str,
        working_dir: str = REPO, config_path: str = DEMO) -> int:
    """``jobs/submit.py`` with ``client``; its exit status."""
    def factory(address: str) -> FakeClient:
        client.address = address
        return client

    argv = [step, "--config", config_path, f"output_root={root}", "--working-dir",
            working_dir, "--runtime-env", RUNTIME_ENV, *args]
    try:
        return submit.main(argv, client_factory=factory)
    except SystemExit as err:
        return int(err.code or 0)


# -- ids --------------------------------------------------------------------------------------
def test_ids_are_deterministic_and_follow_the_step_hash(tmp_path: Path) -> None:
    first, again = config(tmp_path), config(tmp_path)
    knob = config(tmp_path, "stage2.temperature=0.07")
    for step in base.ORDER:
        job_id = submit.submission_id(first, step)
        assert re.fullmatch(rf"demo-{step}-[0-9a-f]{{10}}", job_id)
        assert job_id == submit.submission_id(again, step)
        changed = submit.submission_id(knob, step) != job_id
        assert changed == (step in ("stage2", "evaluate", "export")), step
    run_all = submit.submission_id(first, submit.RUN_ALL)
    assert re.fullmatch(r"demo-run_all-[0-9a-f]{10}", run_all)
    assert run_all == submit.submission_id(again, submit.RUN_ALL)
    assert run_all != submit.submission_id(knob, submit.RUN_ALL)
    assert run_all != submit.submission_id(config(tmp_path, "ablation=true"), submit.RUN_ALL)


# -- attempts ---------------------------------------------------------------------------------
def test_succeeded_job_is_not_submitted_again(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    job_id = submit.submission_id(config(tmp_path), "stage2")
    client = FakeClient({job_id: JobStatus.FAILED, f"{job_id}-retry1": JobStatus.SUCCEEDED})
    assert run(client, "stage2", tmp_path) == 0
    assert client.submitted == []
    assert (f"stage2: complete already (job {job_id}-retry1), outputs at {tmp_path}/stage2"
            in capsys.readouterr().out)


def test_failed_job_is_resubmitted_as_the_next_retry(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    job_id = submit.submission_id(config(tmp_path), "stage1")
    client = FakeClient({job_id: JobStatus.FAILED}, failing=["stage1"])
    assert run(client, "stage1", tmp_path) == 1
    assert client.ids() == [f"{job_id}-retry1"]
    captured = capsys.readouterr()
    assert "resumes from the step's checkpoints" in captured.out
    assert f"[{job_id}-retry1] log line" in captured.out
    assert "boom: CUDA out of memory" in captured.err
    assert f"it resubmits as {job_id}-retry2" in captured.err
    client.failing.clear()
    assert run(client, "stage1", tmp_path) == 0
    assert client.ids() == [f"{job_id}-retry1", f"{job_id}-retry2"]
    assert (f"stage1: done (job {job_id}-retry2), outputs at {tmp_path}/stage1"
            in capsys.readouterr().out)


def test_running_job_is_followed_not_submitted(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    job_id = submit.submission_id(config(tmp_path), "mine_negatives")
    client = FakeClient({job_id: JobStatus.STOPPED, f"{job_id}-retry1": JobStatus.RUNNING},
                        logs=["mining shard 3/8\n"])
    assert run(client, "mine_negatives", tmp_path) == 0
    assert client.submitted == []
    out = capsys.readouterr().out
    assert f"[{job_id}-retry1] mining shard 3/8" in out
    assert f"mine_negatives: done (job {job_id}-retry1)" in out


def test_all_submits_in_order_and_stops_at_the_first_failure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    client = FakeClient(failing=["stage1"])
    assert run(client, "all", tmp_path, "--no-follow") == 2  # each job must end first
    assert "use run_all" in capsys.readouterr().err
    assert run(client, "all", tmp_path) == 1
    assert client.ids() == [submit.submission_id(cfg, step) for step in base.ORDER[:3]]
    assert [shlex.split(call["entrypoint"])[1] for call in client.submitted] == [
        "jobs/prepare_data.py", "jobs/teacher_embed.py", "jobs/stage1.py"]
    assert "stage1: job" in capsys.readouterr().err
    client.failing.clear()  # the rerun skips the two done steps and retries stage 1
    assert run(client, "all", tmp_path) == 0
    assert client.ids()[3:] == [f"{submit.submission_id(cfg, 'stage1')}-retry1",
                                *(submit.submission_id(cfg, step) for step in base.ORDER[3:])]


# -- what is submitted ----------------------------------------------------------------------------
def test_entrypoint_and_runtime_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.setattr(provenance, "git_version",
                        lambda repo: "c0ffee-dirty" if repo == REPO else None)
    client = FakeClient()
    override = "eval.models=[base=student, stage2]"  # a value with spaces
    assert run(client, "run_all", tmp_path, override, "--no-follow") == 0
    [call] = client.submitted
    assert shlex.split(call["entrypoint"]) == [
        "python", "jobs/run_all.py", "--config", "jobs/configs/demo.yaml",
        f"output_root={tmp_path}", override]
    with open(RUNTIME_ENV, encoding="utf-8") as f:
        expected = yaml.safe_load(f)
    expected["working_dir"] = REPO
    expected["env_vars"]["UNIME_CODE_COMMIT"] = "c0ffee-dirty"
    assert call["runtime_env"] == expected
    assert "local-secret" not in repr(call)
    assert client.address == "http://head:8265"
    job_id = submit.submission_id(config(tmp_path, override), submit.RUN_ALL)
    assert call["submission_id"] == job_id
    assert f"ray job logs -f {job_id}" in capsys.readouterr().out


def test_runtime_env_without_yaml_or_commit(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "git_version", lambda repo: None)
    assert submit.build_runtime_env("", REPO) == {"working_dir": REPO}
    bad = tmp_path / "env.yaml"
    bad.write_text("env_vars:\n  AWS_ACCESS_KEY_ID: x\n")
    with pytest.raises(submit.ConfigError, match="AWS_ACCESS_KEY_ID"):
        submit.build_runtime_env(str(bad), REPO)


# -- refusals ---------------------------------------------------------------------------------
def test_config_outside_working_dir_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "demo.yaml"
    shutil.copy(DEMO, outside)
    client = FakeClient()
    assert run(client, "prepare_data", tmp_path / "out", config_path=str(outside)) == 2
    assert "is outside --working-dir" in capsys.readouterr().err
    assert run(client, "prepare_data", tmp_path / "out",
               config_path=str(tmp_path / "missing.yaml")) == 2
    assert "config file not found" in capsys.readouterr().err
    assert client.submitted == [] and client.address is None  # the cluster was never asked


def test_empty_or_relative_output_root_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    client = FakeClient()
    for root in ("", "runs/x"):
        assert run(client, "stage2", root) == 2  # type: ignore[arg-type]
        assert "output_root" in capsys.readouterr().err
    assert client.submitted == [] and client.address is None


def test_complete_outputs_are_not_submitted(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    folder = cfg.step_dir("prepare_data")
    manifest = storage.join(folder, outputs.MANIFEST_NAME)
    storage.write_json(manifest, {"step_hash": base.step_hash(cfg, "prepare_data")})
    client = FakeClient()
    assert run(client, "prepare_data", tmp_path) == 0
    assert client.submitted == []
    assert f"prepare_data: complete already (its manifest has this step hash), outputs at " \
           f"{folder}" in capsys.readouterr().out
    storage.write_json(manifest, {"step_hash": "another config's"})
    assert run(client, "prepare_data", tmp_path) == 0
    assert client.ids() == [submit.submission_id(cfg, "prepare_data")]
