"""run_all's pure parts (the summary table, the ablation variants' configs) and the step
jobs' shared runner (exit codes and messages)."""
from __future__ import annotations

import pathlib
import types

import pytest

from pipeline.cli import run_step
from pipeline.config import ConfigError, load_config
from pipeline.outputs import IncompleteOutputError
from pipeline.runner import ABLATION_VARIANTS, summary_table, variant_config

DEMO = str(pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml")


def test_summary_table_rows_columns_and_missing_values() -> None:
    results = {
        "base": {"mmeb": {"demo_cls": 5.0, "metatask:classification": 5.0,
                          "overall_mean_of_datasets": 3.66},
                 "sugarcrepe": {"mean": 49.6, "add_att": 41.0},
                 "retrieval": {"t2i_R@1": 1.25, "i2t_R@1": 2.5, "t2i_R@5": 6.0}},
        "stage2": {"mmeb": {"demo_cls": 12.345, "metatask:classification": 12.3,
                            "overall_mean_of_datasets": None},
                   "sugarcrepe": {"mean": 51.0}, "retrieval": {"t2i_R@1": 3.0}},
    }
    lines = summary_table(results, title="T").splitlines()
    assert lines[0] == "T" and lines[1].split() == ["base", "stage2"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == ["demo_cls", "overall_mean_of_datasets", "sugarcrepe:mean",
                          "retrieval:t2i_R@1", "retrieval:i2t_R@1"]
    assert rows["demo_cls"] == ["5.00", "12.35"]
    assert rows["overall_mean_of_datasets"] == ["3.66", "-"]
    assert rows["retrieval:i2t_R@1"] == ["2.50", "-"]


@pytest.mark.parametrize("name", list(ABLATION_VARIANTS))
def test_variants_read_the_run_folder_and_change_only_stage2(name: str) -> None:
    config = load_config(DEMO, ["stage2.mode=full_batch"])
    variant = variant_config(config, ABLATION_VARIANTS[name])
    assert variant.run_root == config.run_root and variant.step_dir("stage1") == \
        config.step_dir("stage1")
    assert {k: getattr(variant.stage2, k) for k in ABLATION_VARIANTS[name]} == \
        ABLATION_VARIANTS[name]
    assert (variant.stage1, variant.mining, variant.data) == (config.stage1, config.mining,
                                                              config.data)
    assert (variant.stage2 == config.stage2) == (variant.config_hash == config.config_hash)


def fake_step(run, summarize) -> types.SimpleNamespace:
    """A step named stage2 with no inputs, checks or Ray: only ``run`` and ``summarize``."""
    return types.SimpleNamespace(NAME="stage2", READS=(), USES_RAY=False,
                                 inputs=lambda config: (), check=lambda config: None,
                                 run=run, summarize=summarize)


@pytest.mark.parametrize("error, status, message", [
    (ConfigError("stage2.optim.lr: bad"), 2, "config error: stage2.optim.lr: bad"),
    (IncompleteOutputError("x/mine_negatives has no _manifest.json"), 1,
     "error: x/mine_negatives has no _manifest.json"),
    (FileNotFoundError("model.path: /m does not exist"), 1, "error: model.path: /m does not exist"),
])
def test_step_jobs_exit_with_one_line_for_bad_config_or_missing_input(
        error: Exception, status: int, message: str, capsys: pytest.CaptureFixture) -> None:
    def run(config):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_step(["--config", DEMO], fake_step(run, lambda manifest, folder: "never"), "doc")
    assert exit_info.value.code == status
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_step_job_prints_its_summary(capsys: pytest.CaptureFixture) -> None:
    manifest = run_step(["--config", DEMO, "name=x"],
                        fake_step(lambda config: {"steps": 3},
                                  lambda m, folder: f"{m['steps']} steps -> {folder}"), "doc")
    assert manifest == {"steps": 3}
    assert capsys.readouterr().out.strip().endswith("3 steps -> runs/x-" +
                                                    load_config(DEMO, ["name=x"]).config_hash[
                                                        :10] + "/stage2")
