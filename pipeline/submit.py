"""Submit pipeline steps to a Ray cluster as jobs whose ids make a rerun resume, not redo.

Usage::

    python jobs/submit.py STEP --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b [key=value ...]
        [--address http://127.0.0.1:8265] [--runtime-env cluster/runtime_env.yaml] [--working-dir .] [--no-follow]

STEP is one step (``prepare_data`` ... ``export``, :data:`pipeline.steps.base.ORDER`), ``all``
(every step in order, each its own job, each followed to its end before the next; stops at
the first failure) or ``run_all`` (the whole chain as one job: ``python jobs/run_all.py``).
``--address`` defaults to ``$RAY_ADDRESS``, else http://127.0.0.1:8265 (what
``ray dashboard ray_cluster.yaml`` tunnels to).

Everything that can be refused is refused here, before anything is submitted: the config
(each step's ``check``), an ``output_root`` the cluster cannot keep, a ``--config`` outside
``--working-dir`` (the job is given its path relative to the working dir).

**Ids.** A step's submission id is ``<name>-<step>-<10 hex of its step hash>``
(:func:`pipeline.steps.base.ray_run_name`), ``run_all``'s is ``<name>-run_all-<10 hex>`` over
every step's hash: the same command maps to the same id. Attempts are ``<id>`` then
``<id>-retry<N>``; the latest decides: SUCCEEDED is skipped, PENDING/RUNNING is followed (not
submitted again), FAILED/STOPPED is resubmitted as the next retry, which resumes from the
step's checkpoints and finished shards. Outputs already complete for this step hash (their
manifest says so) are skipped too.

**Runtime env.** ``--runtime-env`` (YAML) plus ``working_dir`` and
``env_vars.UNIME_CODE_COMMIT`` (the working dir's git commit, ``-dirty`` with uncommitted
changes: the job's manifests record it, as ``.git`` is not uploaded). Nothing else of this
machine's environment goes in, never credentials: the nodes use their instance role.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline import outputs, provenance, storage
from pipeline.cli import check_job_output_root, exit_codes
from pipeline.config import Config, ConfigError, load_config, read_yaml_mapping
from pipeline.steps import base

logger = logging.getLogger(__name__)

ALL = "all"
RUN_ALL = "run_all"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = "cluster/runtime_env.yaml"
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
COMPLETE = "COMPLETE"    # nothing to do: a SUCCEEDED attempt, or outputs of this step hash
SUBMITTED = "SUBMITTED"  # submitted and not followed (--no-follow)
FAILED_STATUSES = (JobStatus.FAILED.value, JobStatus.STOPPED.value)


@dataclass(frozen=True)
class Options:
    """How to submit: what the job is given and whether to follow it."""

    config_path: str  # relative to working_dir: the path the job opens
    overrides: tuple[str, ...] = ()
    working_dir: str = "."
    runtime_env: dict[str, Any] = field(default_factory=dict)
    follow: bool = True
    poll_s: float = 5.0


@dataclass(frozen=True)
class Outcome:
    """What became of one step: its job (``attempt`` None: outputs found, no job) and status
    (:data:`COMPLETE`, :data:`SUBMITTED` or the job's last ``JobStatus``)."""

    step: str
    base_id: str
    attempt: int | None
    status: str
    message: str = ""

    @property
    def job_id(self) -> str | None:
        return None if self.attempt is None else attempt_id(self.base_id, self.attempt)

    @property
    def ok(self) -> bool:
        return self.status not in FAILED_STATUSES


# -- ids and attempts ---------------------------------------------------------------------------
def submission_id(config: Config, step: str) -> str:
    """The deterministic id of a step's job (or of ``run_all``'s)."""
    if step != RUN_ALL:
        return base.ray_run_name(config, step)
    parts = [base.step_hash(config, name) for name in base.ORDER]
    parts += ["ablation"] if config.ablation else []  # run_all then trains more: another job
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return f"{config.name}-{RUN_ALL}-{digest[:10]}"


def attempt_id(base_id: str, attempt: int) -> str:
    """``<id>`` for the first attempt, ``<id>-retry<N>`` after it."""
    return f"{base_id}-retry{attempt}" if attempt else base_id


def latest_attempt(jobs: Sequence[Any], base_id: str) -> tuple[int, Any] | None:
    """(N, job details) of the highest attempt of ``base_id`` the cluster knows, or None."""
    pattern = re.compile(re.escape(base_id) + r"(?:-retry(\d+))?")
    found = [(int(match.group(1) or 0), job) for job in jobs
             if (match := pattern.fullmatch(getattr(job, "submission_id", None) or ""))]
    return max(found, key=lambda item: item[0], default=None)


def outputs_complete(config: Config, step: str) -> bool:
    """True when the step's manifest (every step's, for run_all) carries this step hash;
    False when not, or when it cannot be read from here (then the cluster decides)."""
    if step == RUN_ALL and config.ablation:
        return False  # the ablation's outputs have no step manifest to tell
    names = base.ORDER if step == RUN_ALL else (step,)
    try:
        return all(base.finished(config, name) is not None for name in names)
    except outputs.OutputConflictError:
        return False  # another identity's outputs: the job replaces them
    except Exception as err:  # a best-effort look: no access from here is fine
        logger.debug("%s: cannot read the outputs under %s from here (%s)", step,
                     config.run_root, err)
        return False


def output_place(config: Config, step: str) -> str:
    """Where the step's outputs are (the run folder for run_all)."""
    return config.run_root if step == RUN_ALL else config.step_dir(step)


# -- submitting and following -------------------------------------------------------------------
def entrypoint(step: str, options: Options) -> str:
    """``python jobs/<step>.py --config <path> <overrides...>``, shell-quoted."""
    return shlex.join(["python", f"jobs/{step}.py", "--config", options.config_path,
                       *options.overrides])


def submit_step(client: Any, config: Config, step: str, options: Options) -> Outcome:
    """Submit ``step`` unless it is complete or running already; follow it unless told not
    to. ``client`` is a :class:`ray.job_submission.JobSubmissionClient` (or a fake)."""
    base_id = submission_id(config, step)
    latest = latest_attempt(client.list_jobs(), base_id)
    if latest is not None:
        number, job = latest
        status = JobStatus(job.status)
        if status == JobStatus.SUCCEEDED:
            return Outcome(step, base_id, number, COMPLETE)
        if not status.is_terminal():
            print(f"{step}: job {attempt_id(base_id, number)} is {status} already: "
                  "following it, not submitting again", flush=True)
            return finish(client, step, base_id, number, options)
    if outputs_complete(config, step):
        return Outcome(step, base_id, None, COMPLETE)
    number = 0 if latest is None else latest[0] + 1
    job_id = attempt_id(base_id, number)
    if number:
        print(f"{step}: job {attempt_id(base_id, number - 1)} ended {latest[1].status}: "
              f"resubmitting as {job_id} (it resumes from the step's checkpoints and finished "
              "shards)", flush=True)
    client.submit_job(entrypoint=entrypoint(step, options), submission_id=job_id,
                      runtime_env=options.runtime_env)
    logger.info("%s: submitted job %s", step, job_id)
    return finish(client, step, base_id, number, options)


def finish(client: Any, step: str, base_id: str, number: int, options: Options) -> Outcome:
    """Follow the job to its end (``options.follow``), else just name it."""
    if not options.follow:
        return Outcome(step, base_id, number, SUBMITTED)
    info = follow(client, attempt_id(base_id, number), options.poll_s)
    return Outcome(step, base_id, number, JobStatus(info.status).value, info.message or "")


def follow(client: Any, job_id: str, poll_s: float) -> Any:
    """Print the job's logs as they come, then wait for a final status; its job details."""
    try:
        asyncio.run(_print_logs(client, job_id))
    except RuntimeError as err:  # the log stream closed early: the job may still run
        logger.warning("%s: log stream ended (%s); waiting for the job to end", job_id, err)
    info = client.get_job_info(job_id)
    while not JobStatus(info.status).is_terminal():
        time.sleep(poll_s)
        info = client.get_job_info(job_id)
    return info


async def _print_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def report(outcome: Outcome, config: Config) -> None:
    """What became of a step, for the terminal (a failure on stderr)."""
    step, job_id, where = outcome.step, outcome.job_id, output_place(config, outcome.step)
    if outcome.status == COMPLETE:
        by = f"job {job_id}" if job_id else "its manifest has this step hash"
        print(f"{step}: complete already ({by}), outputs at {where}")
    elif outcome.status == JobStatus.SUCCEEDED.value:
        print(f"{step}: done (job {job_id}), outputs at {where}")
    elif outcome.ok:
        state = "submitted" if outcome.status == SUBMITTED else outcome.status
        print(f"{step}: job {job_id} {state}\n  ray job logs -f {job_id}\n"
              f"  ray job status {job_id}")
    else:
        print(f"{step}: job {job_id} {outcome.status}: {outcome.message or 'no message'}\n"
              f"rerun the same command to resume (it resubmits as "
              f"{attempt_id(outcome.base_id, outcome.attempt + 1)})", file=sys.stderr)


# -- the local checks ---------------------------------------------------------------------------
def job_config_path(config_path: str, working_dir: str) -> str:
    """``config_path`` relative to ``working_dir`` (what the job opens), refused outside it."""
    if not os.path.isdir(working_dir):
        raise FileNotFoundError(f"--working-dir {working_dir}: no such folder")
    rel = os.path.relpath(os.path.realpath(config_path), os.path.realpath(working_dir))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise ConfigError(f"--config {config_path} is outside --working-dir {working_dir}: the "
                          "job would not find it (put it under the working dir)")
    return rel.replace(os.sep, "/")


def require_entry_points(steps: Sequence[str], working_dir: str) -> None:
    """Each ``jobs/<step>.py`` the jobs run is in the working dir (the repo root)."""
    for step in steps:
        if not os.path.isfile(os.path.join(working_dir, "jobs", f"{step}.py")):
            raise FileNotFoundError(f"--working-dir {working_dir} has no jobs/{step}.py: "
                                    "point it at the repo root")


def build_runtime_env(path: str, working_dir: str) -> dict[str, Any]:
    """The YAML at ``path`` ('' = none) + ``working_dir`` + ``UNIME_CODE_COMMIT``."""
    env = _read_runtime_env(path) if path else {}
    env_vars = {**env.get("env_vars", {})}
    leaked = sorted(set(env_vars) & set(CREDENTIAL_VARS))
    if leaked:
        raise ConfigError(f"--runtime-env {path}: env_vars.{leaked[0]} is a credential; the "
                          "nodes use their instance role, keep credentials out of it")
    commit = provenance.git_version(working_dir)
    if commit:
        env_vars[provenance.CODE_COMMIT_ENV] = commit
    env = {**env, "working_dir": working_dir}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def _read_runtime_env(path: str) -> dict[str, Any]:
    env = read_yaml_mapping(path, "--runtime-env")
    if not isinstance(env.get("env_vars", {}), dict):
        raise ConfigError(f"--runtime-env {path}: env_vars must be a mapping")
    return env


def steps_of(target: str) -> tuple[str, ...]:
    """The steps a target runs (and whose ``check`` applies)."""
    return base.ORDER if target in (ALL, RUN_ALL) else (target,)


def prepare(args: argparse.Namespace) -> tuple[Config, Options]:
    """Every check that needs no cluster; exits 2 (config) or 1 (a missing file) if one fails."""
    with exit_codes(None):
        config = load_config(args.config, args.overrides)
    with exit_codes(config):
        check_job_output_root(config)
        for step in steps_of(args.step):
            base.get(step).check(config)
        config_path = job_config_path(args.config, args.working_dir)
        scripts = (RUN_ALL,) if args.step == RUN_ALL else steps_of(args.step)
        require_entry_points(scripts, args.working_dir)
        runtime_env = build_runtime_env(args.runtime_env, args.working_dir)
    storage.configure(s3_endpoint_url=config.storage.s3_endpoint_url,
                      s3_region=config.storage.s3_region, max_attempts=1)  # a quick look only
    return config, Options(config_path, tuple(args.overrides), args.working_dir, runtime_env,
                           follow=not args.no_follow)


# -- the command --------------------------------------------------------------------------------
def parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobs/submit.py", description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", metavar="STEP", choices=[*base.ORDER, ALL, RUN_ALL],
                        help=f"{', '.join(base.ORDER)}, {ALL} or {RUN_ALL}")
    parser.add_argument("--config", required=True, help="YAML config inside --working-dir")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
                        help="Ray dashboard address (default: $RAY_ADDRESS, else %(default)s)")
    parser.add_argument("--runtime-env", default=DEFAULT_RUNTIME_ENV,
                        help="runtime env YAML ('' = none; default %(default)s)")
    parser.add_argument("--working-dir", default=".", help="uploaded with each job: the repo "
                        "root (default %(default)s)")
    parser.add_argument("--no-follow", action="store_true",
                        help="return after submitting instead of printing the job's logs")
    return parser


def main(argv: list[str] | None = None,
         client_factory: Callable[[str], Any] = JobSubmissionClient, description: str = "") -> int:
    """Check locally, then submit (and follow) the step(s). Returns 0; a failure raises
    SystemExit: 2 for a bad config, 1 for a failed job, a missing file or an unreachable
    cluster (one line on stderr). ``client_factory(address)`` makes the client."""
    arg_parser = parser(description)
    args = arg_parser.parse_intermixed_args(argv)
    if args.step == ALL and args.no_follow:
        arg_parser.error(f"{ALL} follows each job to its end before the next; use {RUN_ALL} "
                         "for one job to leave running")
    config, options = prepare(args)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status = submit_all(client_factory(args.address), config, args.step, options)
    except (RuntimeError, OSError) as err:  # the cluster refused or cannot be reached
        print(f"error: Ray at {args.address}: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    except KeyboardInterrupt:
        print("\ninterrupted: submitted jobs keep running (ray job list; ray job stop <id>)",
              file=sys.stderr)
        raise SystemExit(130) from None
    if status:
        raise SystemExit(status)
    return 0


def submit_all(client: Any, config: Config, target: str, options: Options) -> int:
    """Submit ``target``'s steps one after the other; stop at the first failure."""
    for step in (base.ORDER if target == ALL else (target,)):
        outcome = submit_step(client, config, step, options)
        report(outcome, config)
        if not outcome.ok:
            return 1
    return 0
