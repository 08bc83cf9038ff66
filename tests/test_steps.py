"""The steps' shape and identities: one module per step, step hashes that change exactly
downstream of a changed knob, fresh-input checks, stale folders, the layering of the package,
and the step jobs' checks before Ray (exit codes, one line, timings)."""
from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys
import time

import pytest

from pipeline import outputs, storage
from pipeline.config import iter_fields, load_config
from pipeline.steps import ORDER, all_steps, base

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")


# -- one home and one shape ------------------------------------------------------------------------
def test_seven_step_modules_with_the_same_shape() -> None:
    files = sorted(p.stem for p in (REPO / "pipeline" / "steps").glob("*.py"))
    assert sorted(ORDER) == [f for f in files if f not in ("__init__", "base")]
    assert ORDER == ("prepare_data", "teacher_embed", "stage1", "mine_negatives", "stage2",
                     "evaluate", "export")
    config = load_config(DEMO)
    for step in all_steps():
        assert step.__name__ == f"pipeline.steps.{step.NAME}"
        assert isinstance(step.USES_RAY, bool) and step.READS
        for hook in ("inputs", "check", "run", "summarize"):
            assert callable(getattr(step, hook)), (step.NAME, hook)
        parents = step.inputs(config)
        assert all(ORDER.index(p) < ORDER.index(step.NAME) for p in parents)
        job = (REPO / "jobs" / f"{step.NAME}.py").read_text()
        assert f'run_step(argv, "{step.NAME}", __doc__)' in job
        assert job.startswith('"""') and "ray job submit" in job


def test_every_hashed_knob_is_read_by_some_step() -> None:
    """A knob that changes outputs must be in some step's identity, or changing it would
    reuse outputs it should redo."""
    reads = {key for step in all_steps() for key in step.READS}
    runtime = ("ray.", "storage.", "output_root", "log_level", "ablation", "name")
    for key, field in iter_fields():
        if key.startswith(runtime) or not field.metadata.get("hashed", True):
            continue
        assert any(key == r or key.startswith(r + ".") for r in reads), key


def test_runner_has_no_step_list_of_its_own() -> None:
    source = (REPO / "pipeline" / "runner.py").read_text()
    for name in ORDER:
        assert f"import {name}" not in source and f".{name}." not in source
    assert "all_steps()" in source


def test_libraries_never_import_the_steps_runner_or_cli() -> None:
    """Layers point down: submit -> cli / runner -> steps -> libraries -> storage / config."""
    upper = ("pipeline.steps", "pipeline.runner", "pipeline.cli", "pipeline.submit")
    for path in (REPO / "pipeline").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("pipeline/steps/", "pipeline/runner.py", "pipeline/cli.py",
                           "pipeline/submit.py")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not any(n.startswith(upper) for n in names), (rel, node.module)


# -- identities ------------------------------------------------------------------------------------
def hashes(*overrides: str) -> dict[str, str]:
    config = load_config(DEMO, list(overrides))
    return {name: base.step_hash(config, name) for name in ORDER}


@pytest.mark.parametrize("override, changed", [
    ("stage2.optim.lr=5e-4", {"stage2", "evaluate", "export"}),
    ("stage2.global_batch_pairs=16", {"stage2", "evaluate", "export"}),
    ("stage1.temperature=0.1", {"stage1", "mine_negatives", "stage2", "evaluate", "export"}),
    ("mining.fn_margin=0.2", {"mine_negatives", "stage2", "evaluate", "export"}),
    ("teacher.instruction_prefix=x", {"teacher_embed", "stage1", "mine_negatives", "stage2",
                                      "evaluate", "export"}),
    ("data.image_size=32", set(ORDER)),
    ("model.dtype=float32", {"stage1", "mine_negatives", "stage2", "evaluate", "export"}),
    ("eval.prompt_mode=raw", {"evaluate"}),
    ("export.dtype=bfloat16", {"export"}),
    ("train.num_workers=4", set()),       # runtime: the math does not depend on it
    ("ray.num_cpus=8", set()),
    ("stage2.max_steps=3", set()),        # a shorter launch of the same run
])
def test_a_change_redoes_exactly_the_steps_downstream(override: str, changed: set) -> None:
    before, after = hashes(), hashes(override)
    assert {name for name in ORDER if before[name] != after[name]} == changed


def test_inputs_follow_the_config() -> None:
    def inputs(name: str, *overrides: str) -> tuple[str, ...]:
        return base.get(name).inputs(load_config(DEMO, list(overrides)))

    assert inputs("mine_negatives") == ("prepare_data", "stage1")
    assert inputs("mine_negatives", "mining.miner=/m") == ("prepare_data",)
    assert inputs("stage2") == ("stage1", "mine_negatives")
    assert inputs("stage2", "stage2.init=/m") == ("mine_negatives",)
    assert inputs("stage2", "stage2.init=student") == ("stage1", "mine_negatives")  # tiny
    assert inputs("evaluate", "eval.models=[a=/x]") == ("prepare_data",)
    assert inputs("evaluate", "eval.models=[stage2]", "eval.mmeb=false") == ("stage2",)
    assert inputs("export", "export.source=stage1") == ("stage1",)
    assert inputs("export", "export.source=/models/x") == ()
    # a stage-2 change of the ablation moves no input of the variant
    assert base.step_hash(load_config(DEMO), "mine_negatives") == base.step_hash(
        load_config(DEMO, ["stage2.mode=full_batch"]), "mine_negatives")


def write_done(config, name: str, **extra) -> None:
    """A finished step folder with this config's identity (what a real run leaves)."""
    base.claim(config, name)
    outputs.write_manifest(config.step_dir(name), {
        "rows_in": 1, "rows_out": 1, "rows_rejected": 0, "seconds": 0.0,
        **base.manifest_fields(config, name), **extra})


def test_fresh_missing_and_stale_inputs(tmp_path: pathlib.Path) -> None:
    config = load_config(DEMO, [f"output_root={tmp_path}"])
    with pytest.raises(base.MissingInputError, match=r"stage2 needs the outputs of stage1, "
                       r"mine_negatives under .*which have not run: run jobs/stage1.py and "
                       r"jobs/mine_negatives.py first"):
        base.require_inputs(config, "stage2")
    write_done(config, "stage1")
    with pytest.raises(base.MissingInputError, match=r"needs the outputs of mine_negatives at "
                       r".*has not run: run jobs/mine_negatives.py first"):
        base.require_inputs(config, "stage2")
    write_done(config, "mine_negatives")
    assert set(base.require_inputs(config, "stage2")) == {"stage1", "mine_negatives"}
    other = load_config(DEMO, [f"output_root={tmp_path}", "mining.fn_margin=0.3"])
    with pytest.raises(base.StaleInputError, match=r"mine_negatives .* other settings "
                       r"\(mining.fn_margin: 0.1 -> 0.3\): rerun jobs/mine_negatives.py"):
        base.require_inputs(other, "stage2")
    # a manifest written by hand (no step_hash) is taken, with a warning
    storage.write_json(f"{tmp_path}/mine_negatives/_manifest.json", {
        "rows_in": 1, "rows_out": 1, "rows_rejected": 0, "seconds": 0.0, "config_hash": "x"})
    assert base.require_inputs(other, "stage2")["mine_negatives"]["config_hash"] == "x"


def test_stale_folder_is_replaced_by_the_runners_and_refused_by_run(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(DEMO, [f"output_root={tmp_path}"])
    write_done(config, "stage2", steps=1)
    other = load_config(DEMO, [f"output_root={tmp_path}", "stage2.optim.lr=5e-4"])
    with pytest.raises(outputs.OutputConflictError,
                       match=r"another config, made with other settings \(stage2.optim.lr"):
        base.finished(other, "stage2")
    assert not base.replace_stale_step(config, "stage2")      # its own: kept
    assert storage.exists(f"{tmp_path}/stage2/_manifest.json")
    assert base.replace_stale_step(other, "stage2")           # another's: replaced
    assert "stage2.optim.lr: 0.001 -> 0.0005" in caplog.text
    assert not storage.exists(f"{tmp_path}/stage2")


# -- the jobs before Ray ---------------------------------------------------------------------------
def job(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)
    return done, time.perf_counter() - start


def test_impossible_mining_settings_exit_2_at_once_with_one_line() -> None:
    done, seconds = job("jobs/mine_negatives.py", "--config", DEMO, "mining.search_k=2",
                        "mining.num_negatives=8")
    assert done.returncode == 2 and seconds < 10
    assert done.stderr.strip().splitlines() == [
        "config error: mining.search_k=2 is below mining.num_negatives=8: too few candidates "
        "to choose from"]


@pytest.mark.parametrize("extra, status, line", [
    ([], 2, "config error: data.sources.nli_csv is set but data.use_demo_world=true ignores "
            "every source: set data.use_demo_world=false to use yours"),
    (["data.use_demo_world=false"], 1,
     "error: data.sources.nli_csv: source file not found: /nonexistent.csv"),
])
def test_missing_source_fails_in_one_line(extra: list[str], status: int, line: str,
                                          tmp_path: pathlib.Path) -> None:
    done, _ = job("jobs/prepare_data.py", "--config", DEMO, "data.sources.nli_csv=/nonexistent.csv",
                  f"output_root={tmp_path}", *extra)
    assert done.returncode == status
    assert done.stderr.strip().splitlines() == [line]
    assert not any(tmp_path.iterdir())


def test_stage2_with_nothing_upstream_names_the_steps_without_starting_ray(
        tmp_path: pathlib.Path) -> None:
    done, seconds = job("jobs/stage2.py", "--config", DEMO, f"output_root={tmp_path}")
    assert done.returncode == 1 and seconds < 15
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: stage2 needs the outputs of stage1, mine_negatives under")
    assert "run jobs/stage1.py and jobs/mine_negatives.py first" in line
    assert not any(tmp_path.iterdir())  # nothing written, Ray never started


def test_stale_upstream_is_named_before_ray(tmp_path: pathlib.Path) -> None:
    write_done(load_config(DEMO, [f"output_root={tmp_path}"]), "prepare_data")
    done, _ = job("jobs/teacher_embed.py", "--config", DEMO, f"output_root={tmp_path}",
                  "data.image_size=32")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "made with other settings (data.image_size: 64 -> 32)" in line
    assert line.endswith("rerun jobs/prepare_data.py first (or jobs/run_all.py)")


def test_help_keeps_the_docstring_and_knobs_are_listed() -> None:
    done, _ = job("jobs/stage2.py", "--help")
    assert done.returncode == 0
    assert "\nLocal:    python jobs/stage2.py --config jobs/configs/demo.yaml\n" in done.stdout
    assert "--show-config" in done.stdout
    done, _ = job("jobs/stage2.py", "--show-config", "--config", DEMO, "stage2.lora.rank=4")
    assert done.returncode == 0
    assert "stage2.lora.rank = 4  (int min 1)" in done.stdout.splitlines()
    assert len([ln for ln in done.stdout.splitlines() if " = " in ln and not ln.startswith(" ")
                ]) == len(list(iter_fields()))


def test_custom_template_loads_and_names_its_missing_sources(tmp_path: pathlib.Path) -> None:
    custom = str(REPO / "jobs" / "configs" / "custom.yaml")
    config = load_config(custom, [f"output_root={tmp_path}"])
    assert config.data.use_demo_world is False and config.data.sources.nli_csv
    done, _ = job("jobs/run_all.py", "--config", custom, f"output_root={tmp_path}")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: data.sources.")


def test_run_step_checks_before_ray_in_order() -> None:
    """check -> check_sources -> inputs -> preflight, all before init_ray (by source order)."""
    from pipeline import cli

    body = inspect.getsource(cli.run_step)
    assert body.index("check_before_ray") < body.index("init_ray")
    checks = inspect.getsource(cli.check_before_ray)
    order = [checks.index(s) for s in ("step.check(", '"check_sources"', "require_inputs",
                                       '"preflight"')]
    assert order == sorted(order)
