"""run_all end to end on a small demo world: a stage-2 change reuses every earlier step and
redoes stage 2, evaluate and export; a batch the prepared data cannot fill is refused as soon
as prepare_data is done, before the teacher runs."""
from __future__ import annotations

import pathlib

import pytest

from pipeline import outputs, storage
from pipeline.config import ConfigError, load_config
from pipeline.runner import RUN_FILE, run_all
from pipeline.steps import ORDER, base

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
# 4 datasets x 12 pairs, 40 text groups, 8 eval images; two short training stages.
SMALL = ["data.demo.num_train_images=12", "data.demo.num_eval_images=8",
         "data.demo.num_nli_groups=40", "data.demo.num_eval_candidates=4",
         "data.demo.image_size_px=32", "data.image_size=16", "data.rows_per_shard=24",
         "ray.progress_bars=false", "teacher.num_actors=1", "mining.num_actors=1",
         "mining.num_negatives=3", "eval.num_actors=1",
         "stage1.global_batch_groups=8", "stage1.epochs=1", "stage1.max_steps=2",
         "stage2.global_batch_pairs=8", "stage2.steps=2", "stage2.infonce_warmup_steps=1",
         "stage2.mined_negatives=2", "train.checkpoint_every_steps=2"]

pytestmark = pytest.mark.integration


def written(root: pathlib.Path) -> dict[str, str | None]:
    """Each step's manifest ``written_at`` (None when absent)."""
    return {name: (outputs.read_manifest(str(root / name)) or {}).get("written_at")
            for name in ORDER}


def test_a_stage2_change_reuses_every_earlier_step(ray_local, tmp_path: pathlib.Path) -> None:
    root = tmp_path / "run"
    first = load_config(DEMO, [*SMALL, f"output_root={root}"])
    run_all(first)
    before = written(root)
    assert all(before.values())
    second = load_config(DEMO, [*SMALL, f"output_root={root}", "stage2.optim.lr=5e-4"])
    run_all(second)
    after = written(root)
    reused = ("prepare_data", "teacher_embed", "stage1", "mine_negatives")
    assert {name: after[name] for name in reused} == {name: before[name] for name in reused}
    assert all(after[name] != before[name] for name in ("stage2", "evaluate", "export"))
    stage2 = outputs.read_manifest(str(root / "stage2"))
    assert stage2["step_hash"] == base.step_hash(second, "stage2")
    assert stage2["identity"]["settings"]["stage2"]["optim"]["lr"] == 5e-4
    record = storage.read_json(str(root / RUN_FILE))
    assert record["steps"] == {name: base.step_hash(second, name) for name in ORDER}
    assert record["steps"]["stage1"] == base.step_hash(first, "stage1")


def test_a_batch_the_data_cannot_fill_is_refused_right_after_prepare(
        ray_local, tmp_path: pathlib.Path) -> None:
    config = load_config(DEMO, [*SMALL, f"output_root={tmp_path}", "stage2.batching=per_dataset",
                                "stage2.global_batch_pairs=16"])
    with pytest.raises(ConfigError, match=r"stage2.batching=per_dataset: .*\(12\) have fewer "
                       r"pairs than stage2.global_batch_pairs=16"):
        run_all(config)
    assert outputs.read_manifest(str(tmp_path / "prepare_data")) is not None
    assert not (tmp_path / "teacher_embed").exists()
