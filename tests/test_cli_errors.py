"""The one line a job prints for an error a user can fix: a student folder that is not there
(before Ray starts), a Ray instance that does not start in time, and project errors that come
back from Ray tasks and actors wrapped in Ray's own. No test here starts Ray: ``ray.init`` is
replaced wherever it would be reached."""
from __future__ import annotations

import logging
import os
import pathlib
import sys

import pytest

from pipeline import cli, ray_utils, storage
from pipeline.config import ConfigError, load_config
from pipeline.data.readers import SourceError
from pipeline.steps import base

pytestmark = pytest.mark.reliability

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
STARTUP_TIMEOUT = ("The current node timed out during startup. This could happen because some "
                   "of the raylet failed to startup or the GCS has become overloaded.")


def exit_with(err: BaseException, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of ``err`` raised inside ``cli.exit_codes``."""
    with pytest.raises(SystemExit) as info, cli.exit_codes(None):
        raise err
    return info.value.code, capsys.readouterr().err.splitlines()


# -- model.path before Ray ------------------------------------------------------------------------
@pytest.mark.parametrize("step, overrides, loads", [
    ("stage1", [], True),
    ("stage2", [], False),                       # stage2.init=stage1: the stage-1 model
    ("stage2", ["stage2.init=student"], True),
    ("evaluate", [], True),                      # eval.models holds base=student
    ("evaluate", ["eval.models=[stage1, stage2]"], False),
    ("export", [], False),                       # model.path only names the card's base model
    ("prepare_data", [], False),
    ("mine_negatives", [], False),
])
def test_steps_that_load_the_student(step: str, overrides: list[str], loads: bool) -> None:
    assert cli.loads_student(load_config(DEMO, overrides), base.get(step)) is loads


def test_a_missing_student_folder_is_refused_by_the_steps_that_load_it(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    config = load_config(DEMO, [f"model.path={missing}", "eval.models=[base=student]"])
    for step in ("stage1", "evaluate"):
        with pytest.raises(FileNotFoundError) as info:
            cli.check_model_path(config, base.get(step))
        assert str(info.value) == f"model.path: {missing} does not exist"
    cli.check_model_path(config, base.get("stage2"))  # starts from stage 1: not needed
    missing.mkdir()  # made after the config was loaded: the check runs at check time
    cli.check_model_path(config, base.get("stage1"))


def test_a_file_or_relative_path_is_named_as_such(tmp_path, monkeypatch) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"^model.path: .*model.safetensors is a file, "
                                                r"not a model folder$"):
        cli.check_model_path(load_config(DEMO, [f"model.path={weights}"]), base.get("stage1"))
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO, ["model.path=models/m"])
    with pytest.raises(FileNotFoundError) as info:
        cli.check_model_path(config, base.get("stage1"))
    assert str(info.value) == f"model.path: models/m ({tmp_path}/models/m) does not exist"


@pytest.mark.parametrize("path", ["tiny:llava_next", "s3://bucket/models/m"])
def test_tiny_and_s3_students_are_not_looked_for_on_disk(path: str) -> None:
    cli.check_model_path(load_config(DEMO, [f"model.path={path}"]), base.get("stage1"))


def test_check_before_ray_refuses_a_student_that_is_no_folder(tmp_path) -> None:
    # evaluate's own check_sources does not look at the student; stage 2's takes a file
    config = load_config(DEMO, [f"model.path={tmp_path}/absent", "stage2.init=student",
                                f"output_root={tmp_path}/run"])
    with pytest.raises(FileNotFoundError, match=r"^model.path: .*/absent does not exist$"):
        cli.check_before_ray(config, base.get("evaluate"), inputs=False)
    (tmp_path / "weights.bin").write_bytes(b"x")
    config = load_config(DEMO, [f"model.path={tmp_path}/weights.bin", "stage2.init=student",
                                f"output_root={tmp_path}/run"])
    with pytest.raises(FileNotFoundError, match=r"weights.bin is a file, not a model folder$"):
        cli.check_before_ray(config, base.get("stage2"), inputs=False)


def test_a_student_job_exits_1_with_one_line_before_ray(tmp_path, monkeypatch, capsys) -> None:
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start"))
    with pytest.raises(SystemExit) as info:
        cli.run_step(["--config", DEMO, f"model.path={tmp_path}/absent",
                      f"output_root={tmp_path}/run"], "stage1")
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: model.path: {tmp_path}/absent does not exist"]


def test_a_bad_tiny_family_is_a_config_error_at_exit_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.run_step(["--config", DEMO, "model.path=tiny:gpt2", f"output_root={tmp_path}"],
                     "stage1")
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("config error: model.path=tiny:gpt2: unknown family 'gpt2'; tiny:<family> "
                    "takes one of llava_next, qwen2_vl, qwen2_5_vl, phi3_v")


def test_a_nan_knob_is_a_config_error_at_exit_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_config(["--config", DEMO, "stage2.fn_margin=nan"], "doc")
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "config error: stage2.fn_margin=nan: not a finite number"]


# -- Ray start-up ---------------------------------------------------------------------------------
@pytest.fixture
def no_ray_start(monkeypatch):
    """``ray.init`` replaced by one that records its call and fails like a slow start."""
    import ray

    calls: list[dict] = []

    def init(*args, **kwargs):
        calls.append(kwargs)
        raise Exception(STARTUP_TIMEOUT + "\nmore detail")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in ray_utils.START_WAIT_ENV:
        monkeypatch.setenv(key, "7")  # restored after the test
    return calls


def test_a_local_start_that_times_out_names_the_knob(no_ray_start, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.ray_utils")
    config = load_config(DEMO, ["ray.start_timeout_s=45.5"])
    with pytest.raises(ray_utils.RayStartError) as info:
        ray_utils.init_ray(config)
    assert len(no_ray_start) == 1 and "address" not in no_ray_start[0]
    assert str(info.value) == (
        "Ray did not start within ray.start_timeout_s=45.5 s (machine load?); raise "
        "ray.start_timeout_s, lower ray.num_cpus, or start Ray once (ray start --head) and "
        f"join it with ray.address=auto. Ray said: {STARTUP_TIMEOUT}")
    # Ray's waits for the GCS and the node's registration follow the knob (whole seconds).
    assert {key: os.environ[key] for key in ray_utils.START_WAIT_ENV} == {
        "RAY_raylet_start_wait_time_s": "46", "RAY_gcs_server_port_wait_time_s": "46"}
    assert "ray.start_timeout_s replaces RAY_raylet_start_wait_time_s=7 with 46" in caplog.text
    assert "Ray was imported before init_ray" in caplog.text  # this test imported it


def test_the_start_error_is_one_line_at_exit_1(no_ray_start, capsys) -> None:
    config = load_config(DEMO, ["ray.start_timeout_s=30"])
    with pytest.raises(SystemExit) as info, cli.exit_codes(config):
        ray_utils.init_ray(config)
    assert info.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: Ray did not start within ray.start_timeout_s=30 s")


def test_other_start_failures_and_joins_are_left_alone(no_ray_start, monkeypatch) -> None:
    import ray

    def refuse(*args, **kwargs):
        raise ValueError("object_store_memory is too large")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ValueError, match="object_store_memory is too large"):
        ray_utils.init_ray(load_config(DEMO))
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(
        ConnectionError("Failed to connect to GCS at 10.0.0.1:6379: timed out")))
    for key in ray_utils.START_WAIT_ENV:
        monkeypatch.setenv(key, "7")
    with pytest.raises(ConnectionError):  # joining a cluster: its own error, env untouched
        ray_utils.init_ray(load_config(DEMO, ["ray.address=10.0.0.1:6379"]))
    assert all(os.environ[key] == "7" for key in ray_utils.START_WAIT_ENV)


# -- errors from Ray tasks and actors -------------------------------------------------------------
def task_error(cause: BaseException, *, dual: bool = True) -> BaseException:
    """What the driver gets when a Ray task raised ``cause``: a RayTaskError that travelled
    through pickling, as an instance of the cause's class too (Ray's ``as_instanceof_cause``)
    unless ``dual`` is False."""
    from ray import cloudpickle
    from ray.exceptions import RayTaskError

    err = RayTaskError("shard_task", "Traceback (most recent call last):\n  ...\n"
                       f"{type(cause).__name__}: {cause}", cause, proctitle="ray::task",
                       pid=1, ip="127.0.0.1")
    err = cloudpickle.loads(cloudpickle.dumps(err))  # as Ray moves it (RayError.to_bytes)
    return err.as_instanceof_cause() if dual else err


def test_a_storage_error_from_a_ray_task_is_one_line(capsys) -> None:
    err = task_error(storage.StorageError("s3://bucket/run/x.parquet: write failed "
                                          "(AccessDenied); check the credentials"))
    assert isinstance(err, storage.StorageError)
    assert len(str(err).splitlines()) == 3 and "ray::task" in str(err)  # Ray's text
    status, lines = exit_with(err, capsys)
    assert (status, lines) == (1, ["error: s3://bucket/run/x.parquet: write failed "
                                   "(AccessDenied); check the credentials"])


def shard_failure(error: Exception, monkeypatch) -> BaseException:
    """The exception a failed shard task hands Ray Data (``ray_utils._call_task`` runs here,
    with ``ray.get`` replaced: no Ray)."""
    import ray

    def fail(task):
        raise error

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    with pytest.raises(Exception) as info:
        ray_utils._call_task({"task_index": [3]}, fail, ["task 0", "1", "2", "task 3"])
    return info.value


def test_a_shard_task_error_survives_ray_datas_trip_to_the_driver(monkeypatch, capsys) -> None:
    from ray.exceptions import UserCodeException

    raised = shard_failure(SourceError("pairs.jsonl:7: qry_image missing"), monkeypatch)
    assert isinstance(raised, UserCodeException)
    assert str(raised) == "shard task 3 failed: SourceError: pairs.jsonl:7: qry_image missing"
    # The driver: Ray Data re-raises the task's error without its traceback, and a caller
    # may wrap it again (as Ray Train does, with ``raise ... from``).
    try:
        try:
            raise task_error(raised).with_traceback(None)
        except Exception as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as outer:
        status, lines = exit_with(outer, capsys)
    assert (status, lines) == (1, ["error: pairs.jsonl:7: qry_image missing"])


class TwoPartError(storage.StorageError):
    """Pickles, but does not unpickle: its arguments are not its ``args``."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")


def test_an_error_that_does_not_unpickle_travels_as_text_only(monkeypatch) -> None:
    raised = shard_failure(TwoPartError("s3://b/x", "write failed"), monkeypatch)
    assert "cause" not in vars(raised)
    assert str(raised) == "shard task 3 failed: TwoPartError: s3://b/x: write failed"
    assert cli.user_error(task_error(raised)) is None
    kept = shard_failure(storage.StorageError("s3://b/x: write failed"), monkeypatch)
    assert isinstance(vars(kept)["cause"], storage.StorageError)


def test_an_actor_that_died_in_init_shows_its_error(capsys) -> None:
    from ray.exceptions import ActorDiedError

    died = ActorDiedError(task_error(FileNotFoundError("model.path: /m does not exist"),
                                     dual=False))
    assert "The actor died because of an error raised in its creation task" in str(died)
    assert exit_with(died, capsys) == (1, ["error: model.path: /m does not exist"])


def test_a_config_error_from_a_task_exits_2(capsys) -> None:
    err = task_error(ConfigError("train.num_workers=3: does not divide the batch"))
    assert exit_with(err, capsys) == (2, ["config error: train.num_workers=3: does not "
                                          "divide the batch"])


def test_other_task_errors_keep_their_traceback() -> None:
    from ray.exceptions import RayTaskError

    err = task_error(ValueError("a bug"))
    with pytest.raises(RayTaskError) as info, cli.exit_codes(None):
        raise err
    assert info.value is err


def test_a_project_error_is_not_unwrapped_past_itself(capsys) -> None:
    """``raise ConfigError(...) from FileNotFoundError`` (a missing config file) keeps its
    own line: only Ray's wrappers are looked through."""
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory", "x.yaml")
        except FileNotFoundError as err:
            raise ConfigError("config file not found: x.yaml") from err
    except ConfigError as err:
        assert exit_with(err, capsys) == (2, ["config error: config file not found: x.yaml"])


def test_no_ray_import_to_tell_errors_apart() -> None:
    """A config error before Ray starts never imports Ray (its import fixes Ray's start-up
    waits: ``ray_utils.START_WAIT_ENV``)."""
    import subprocess

    code = ("import sys\nfrom pipeline import cli\n"
            "try:\n    cli.parse_config(['--config', sys.argv[1], 'stage1.optim.lr=inf'], '')\n"
            "except SystemExit as e:\n    print(e.code, 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, DEMO], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert out.stderr.splitlines() == ["config error: stage1.optim.lr=inf: not a finite number"]
