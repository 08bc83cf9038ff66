"""The cluster path as users take it: each step submitted as a Ray job to a real head on
loopback, with the repository's ``cluster/runtime_env.yaml`` and ``--working-dir .``.

prepare_data goes through the ``ray job submit`` CLI exactly as the README writes it; the
other steps through ``jobs/submit.py`` (the Jobs API client, as the CLI uses it). A finished
step submitted again is skipped; stage 2 stopped mid-run and submitted again resumes from its
checkpoint.
"""
from __future__ import annotations

import glob
import json
import pathlib
import subprocess
import time

import pytest

from tests.ray_head import RAY, head_env, ray_head

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/demo.yaml"
# 4 datasets x 12 pairs, 40 text groups; two short training stages (stage 2 checkpoints
# every step, 30 of them, so that a stop lands between checkpoints).
SMALL = ["data.demo.num_train_images=12", "data.demo.num_eval_images=8",
         "data.demo.num_nli_groups=40", "data.demo.num_eval_candidates=4",
         "data.demo.image_size_px=32", "data.image_size=16", "data.rows_per_shard=24",
         "teacher.num_actors=1", "mining.num_actors=1", "mining.num_negatives=3",
         "stage1.global_batch_groups=8", "stage1.epochs=1", "stage1.max_steps=2",
         "stage2.global_batch_pairs=8", "stage2.steps=30", "stage2.infonce_warmup_steps=1",
         "stage2.mined_negatives=2", "train.checkpoint_every_steps=1"]

pytestmark = pytest.mark.integration


def manifest(root: pathlib.Path, step: str) -> dict:
    return json.loads((root / step / "_manifest.json").read_text())


def submit(address: str, *argv: str) -> int:
    from pipeline import submit as submit_module

    try:
        submit_module.main([*argv, "--address", address])
    except SystemExit as err:
        return int(err.code or 0)
    return 0


def registered_checkpoints(stage_dir: pathlib.Path) -> list[str]:
    """Checkpoints Ray Train has registered (in its snapshot: a folder alone may be one
    being written, which a resume does not know of)."""
    names = []
    for snapshot in glob.glob(str(stage_dir / "ray" / "*" / "checkpoint_manager_snapshot.json")):
        try:
            results = json.loads(pathlib.Path(snapshot).read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # being rewritten
            continue
        names += [r["checkpoint_dir_name"] for r in results]
    return names


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.reliability
def test_steps_as_ray_jobs_skip_when_done_and_resume_after_a_stop(
        no_local_ray, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = tmp_path / "run"
    overrides = [*SMALL, f"output_root={root}"]
    monkeypatch.chdir(REPO)
    with ray_head() as address:
        client = JobSubmissionClient(address)
        # The README's command, verbatim but for the address and the test's overrides.
        cli = [RAY, "job", "submit", f"--address={address}", "--working-dir", ".",
               "--runtime-env", "cluster/runtime_env.yaml", "--",
               "python", "jobs/prepare_data.py", "--config", CONFIG, *overrides]
        done = subprocess.run(cli, cwd=REPO, env=head_env(), capture_output=True, text=True,
                              timeout=600)
        assert "succeeded" in done.stdout.lower(), done.stdout[-3000:] + done.stderr[-3000:]
        assert manifest(root, "prepare_data")["rows_out"] > 0

        for step in ("teacher_embed", "stage1", "mine_negatives"):
            assert submit(address, step, "--config", CONFIG, *overrides) == 0, step
            assert manifest(root, step)["rows_out"] > 0
        jobs = {job.submission_id: job.status for job in client.list_jobs()}
        assert all(status == JobStatus.SUCCEEDED for status in jobs.values()), jobs
        assert manifest(root, "stage1")["worker_nodes"]  # each rank's node is recorded
        # A quiet job log: no progress bars from the training workers (cursor escapes), the
        # resolved config only at DEBUG.
        (stage1_job,) = [job for job in jobs if "-stage1-" in job]
        log = client.get_job_logs(stage1_job)
        print(f"stage-1 job log: {len(log.splitlines())} lines")
        assert "\x1b[A" not in log and "\r" not in log, log[-2000:]
        assert "resolved config" not in log

        # A finished step submitted again: no new job.
        assert submit(address, "teacher_embed", "--config", CONFIG, *overrides) == 0
        assert len(client.list_jobs()) == len(jobs)

        # Stage 2, stopped once a checkpoint exists, then submitted again: it resumes.
        assert submit(address, "stage2", "--config", CONFIG, *overrides, "--no-follow") == 0
        (first,) = [j for j in client.list_jobs() if "-stage2-" in j.submission_id]
        wait_for(lambda: registered_checkpoints(root / "stage2"), timeout_s=400,
                 what="a stage-2 checkpoint")
        client.stop_job(first.submission_id)
        wait_for(lambda: client.get_job_status(first.submission_id).is_terminal(),
                 timeout_s=120, what="the stop")
        assert client.get_job_status(first.submission_id) == JobStatus.STOPPED
        assert submit(address, "stage2", "--config", CONFIG, *overrides) == 0
        stage2 = manifest(root, "stage2")
        assert stage2["steps"] == 30
        assert 1 <= stage2["resumed_from_step"] < 30
        retried = client.get_job_status(first.submission_id + "-retry1")
        assert retried == JobStatus.SUCCEEDED
        # Provenance under --working-dir: no .git there, the source hash is recorded.
        assert "+src." in stage2["code_version"]
