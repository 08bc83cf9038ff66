"""The training loop's pure parts: LR schedule, data order and equal steps per rank, frozen
guards, metrics files, stage-1 row decoding, config checks, similarity agreement."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.data.schemas import group_table
from pipeline.steps.stage1 import check as check_config
from pipeline.train import loop
from pipeline.train.checkpoint import FrozenParameterError, frozen_fingerprint, verify_frozen
from pipeline.train.metrics import MetricsLogger, read_metrics
from pipeline.train.stage1 import _average_ranks, decode_groups, similarity_agreement


# -- LR schedule -----------------------------------------------------------------------------------
def multipliers(schedule: str, total: int = 10, warmup: int = 2) -> list[float]:
    return [loop.lr_multiplier(s, warmup_steps=warmup, total_steps=total, schedule=schedule)
            for s in range(total)]


def test_linear_schedule_hand_computed() -> None:
    # 2 warm-up steps (1/2, 2/2), then 8 decay steps: 1 - k/8 for k = 0..7.
    expected = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert multipliers("linear") == pytest.approx(expected)


def test_cosine_and_constant_schedules_hand_computed() -> None:
    cosine = multipliers("cosine")
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine[4] == pytest.approx((1 + math.cos(math.pi / 4)) / 2)  # progress 2/8
    assert cosine[6] == pytest.approx(0.5)                              # progress 4/8
    assert cosine[9] == pytest.approx((1 + math.cos(math.pi * 7 / 8)) / 2)
    assert multipliers("constant") == pytest.approx([0.5] + [1.0] * 9)
    with pytest.raises(ValueError, match="unknown schedule"):
        multipliers("step")


def test_warmup_steps_round_up() -> None:
    assert loop.warmup_steps(711, 0.05) == 36      # the paper's 2 epochs, ceil(35.55)
    assert loop.warmup_steps(30, 0.1) == 3         # 0.1 * 30 = 3.0000000000000004
    assert loop.warmup_steps(15, 0.1) == 2
    assert loop.warmup_steps(10, 0.0) == 0
    assert multipliers("linear", total=4, warmup=0) == pytest.approx([1, 0.75, 0.5, 0.25])


# -- data order and steps per rank ---------------------------------------------------------------
def test_steps_per_epoch_and_errors() -> None:
    assert loop.steps_per_epoch(40, 8, 2) == 5
    assert loop.steps_per_epoch(1000, 32, 2) == 31   # 8 groups dropped (drop last)
    with pytest.raises(ValueError, match="multiple of train.num_workers"):
        loop.steps_per_epoch(40, 9, 2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loop.steps_per_epoch(7, 8, 2)


def test_unequal_steps_across_ranks_fail_fast() -> None:
    assert loop.steps_per_rank([5, 5, 5]) == 5
    with pytest.raises(loop.StepMismatchError, match=r"rank 0: 5, rank 1: 4.*hang"):
        loop.steps_per_rank([5, 4])


def test_epoch_order_is_seeded_and_global_batches_do_not_depend_on_workers() -> None:
    order = loop.epoch_order(40, seed=0, epoch=1)
    np.testing.assert_array_equal(order, loop.epoch_order(40, seed=0, epoch=1))
    assert not np.array_equal(order, loop.epoch_order(40, seed=0, epoch=2))
    assert not np.array_equal(order, loop.epoch_order(40, seed=1, epoch=1))
    assert sorted(order) == list(range(40))
    for step in range(5):
        one = loop.local_positions(order, step, 0, global_batch_rows=8, world_size=1)
        two = [loop.local_positions(order, step, r, global_batch_rows=8, world_size=2)
               for r in range(2)]
        four = [loop.local_positions(order, step, r, global_batch_rows=8, world_size=4)
                for r in range(4)]
        np.testing.assert_array_equal(np.concatenate(two), one)   # rank order = batch order
        np.testing.assert_array_equal(np.concatenate(four), one)
        np.testing.assert_array_equal(one, order[step * 8:(step + 1) * 8])


def loop_settings(num_rows: int, global_batch_rows: int, groups: tuple[int, ...] = ()
                  ) -> loop.LoopSettings:
    return loop.LoopSettings(stage="stage2", stage_dir="/tmp/x", train=TrainConfig(num_workers=2),
                             optim=None, global_batch_rows=global_batch_rows,  # type: ignore[arg-type]
                             row_keys=tuple(f"k{i:03d}" for i in range(num_rows)),
                             precision="fp32", use_gpu=False, row_groups=groups)


def test_rows_used_counts_distinct_rows() -> None:
    settings = loop_settings(13, 4)
    assert settings.steps_per_epoch == 3
    assert loop.rows_used(13, settings, 2) == 8      # first epoch: all distinct
    assert loop.rows_used(13, settings, 3) == 12     # one group dropped by drop-last
    assert 12 <= loop.rows_used(13, settings, 6) <= 13


def test_grouped_epoch_order_makes_single_group_batches() -> None:
    rng = np.random.default_rng(5)
    groups = tuple(int(g) for g in rng.integers(0, 3, size=50))  # sizes vary by group
    sizes = np.bincount(groups)
    settings = loop_settings(50, 4, groups)
    assert settings.steps_per_epoch == int((sizes // 4).sum())
    for epoch in range(3):
        order = settings.epoch_order(epoch)
        assert len(order) == settings.steps_per_epoch * 4
        assert len(set(order.tolist())) == len(order)            # no row twice in an epoch
        batches = order.reshape(-1, 4)
        assert all(len({groups[p] for p in batch}) == 1 for batch in batches)
        per_group = np.bincount([groups[b[0]] for b in batches], minlength=3)
        np.testing.assert_array_equal(per_group, sizes // 4)     # every whole batch, once
        np.testing.assert_array_equal(order, settings.epoch_order(epoch))  # seeded
    assert not np.array_equal(settings.epoch_order(0), settings.epoch_order(1))
    # batches of different groups are interleaved, not one group after another
    first = [groups[b[0]] for b in settings.epoch_order(0).reshape(-1, 4)]
    assert sum(a != b for a, b in zip(first[:-1], first[1:], strict=True)) > len(sizes) - 1
    assert loop.rows_used(50, settings, 4 * settings.steps_per_epoch) > len(order)


def test_grouped_steps_per_epoch_errors() -> None:
    with pytest.raises(ValueError, match="largest group: 3 rows"):
        loop.steps_per_epoch(6, 4, 2, groups=(0, 0, 0, 1, 1, 1))
    with pytest.raises(ValueError, match="5 row groups for 6 rows"):
        loop.steps_per_epoch(6, 2, 2, groups=(0, 0, 0, 1, 1))
    assert loop.steps_per_epoch(7, 2, 2, groups=(0, 0, 0, 1, 1, 1, 2)) == 2


# -- frozen guards ---------------------------------------------------------------------------------
def test_frozen_fingerprint_detects_one_ulp() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    module[0].requires_grad_(False)
    before = frozen_fingerprint(module)
    assert set(before) == {"0.weight", "0.bias"}
    with torch.no_grad():
        module[1].weight.add_(1.0)  # trainable: allowed to change
    assert verify_frozen(module, before) == 2
    with torch.no_grad():
        module[0].weight[0, 0] = torch.nextafter(module[0].weight[0, 0], torch.tensor(9.0))
    with pytest.raises(FrozenParameterError, match="0.weight"):
        verify_frozen(module, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_checksum_sees_any_single_element_change(dtype: torch.dtype) -> None:
    """The checksum frozen_fingerprint uses on GPUs (run here on the CPU): one element one ulp
    off, or two elements swapped, changes it; the same values in a copy do not."""
    from pipeline.train.checkpoint import FINGERPRINT_CHUNK, tensor_checksum

    data = torch.randn(FINGERPRINT_CHUNK + 1000, generator=torch.Generator().manual_seed(0)
                       ).to(dtype)  # more than one chunk
    reference = tensor_checksum(data)
    assert tensor_checksum(data.clone()) == reference
    for index in (0, 17, FINGERPRINT_CHUNK - 1, FINGERPRINT_CHUNK + 999):
        changed = data.clone()
        changed[index] = torch.nextafter(changed[index], torch.tensor(9.0, dtype=dtype))
        assert tensor_checksum(changed) != reference, index
    swapped = data.clone()
    swapped[[3, 4]] = data[[4, 3]]
    assert data[3] != data[4] and tensor_checksum(swapped) != reference


# -- metrics ---------------------------------------------------------------------------------------
def row(step: int) -> dict:
    return {"step": step, "epoch": 0, "loss": 10.0 / step, "lr": 1e-3, "grad_norm": 1.0,
            "samples_per_s": 100.0, "tokens_per_s": 1000.0, "step_s": 0.1,
            "elapsed_s": 0.1 * step}


def test_metrics_files_and_resume(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    stage = str(tmp_path / "stage")
    metrics = MetricsLogger(stage, name="stage1", total_steps=4, log_every_steps=2,
                            sample_unit="texts")
    with caplog.at_level("INFO", logger="pipeline.train.metrics"):
        for step in (1, 2, 3):
            metrics.log(row(step))
    metrics.flush(plot=False)  # the loop's flush between checkpoints: no PNG drawn
    assert [r["step"] for r in read_metrics(stage)] == [1, 2, 3]
    assert not (tmp_path / "stage" / "curves.png").exists()
    metrics.close()
    assert [r["step"] for r in read_metrics(stage)] == [1, 2, 3]
    assert (tmp_path / "stage" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "stage" / "tensorboard").glob("events.out.tfevents.*"))
    lines = [r.message for r in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("stage1 step 2/4 (epoch 1) | loss 5.0000")
    assert "100 texts/s" in lines[1] and "eta" in lines[1]

    resumed = MetricsLogger(stage, name="stage1", total_steps=4, log_every_steps=2,
                            resume_step=2)
    assert [r["step"] for r in resumed.rows] == [1, 2]  # step 3 is trained again
    resumed.log(row(3))
    resumed.close()
    assert [r["step"] for r in read_metrics(stage)] == [1, 2, 3]


# -- stage 1 -------------------------------------------------------------------------------------
def test_decode_groups_round_trips_teacher_rows() -> None:
    emb = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    table = group_table(["a", "b"], [["a0", "a1", "a2"], ["b0", "b1", "b2"]], emb, 5)
    groups = decode_groups(table.slice(1), texts_per_group=3)  # a sliced batch keeps offsets
    assert list(groups) == ["b"] and groups["b"].texts == ("b0", "b1", "b2")
    np.testing.assert_array_equal(groups["b"].teacher_emb, emb[3:].astype(np.float16))
    with pytest.raises(ValueError, match="every group must have 2"):
        decode_groups(table, texts_per_group=2)


@pytest.mark.parametrize("overrides, pattern", [
    (["stage1.global_batch_groups=9", "train.num_workers=2"],
     r"stage1.global_batch_groups=9 is not a multiple of train.num_workers=2"),
    (["model.path=tiny:phi3_v"], r"model.path=tiny:phi3_v: tiny models exist for"),
    (["model.path=tiny:qwen2_vl", "model.family=llava_next"], r"contradicts model.path"),
    (["model.path=/x", "model.family=phi3_v"], r"model.trust_remote_code: .*phi3_v"),
    (["train.grad_cache_chunk_size=4", "train.zero_stage=0"], r"needs train.zero_stage >= 1"),
])
def test_config_errors_name_the_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        check_config(load_config(None, overrides))


def test_config_fits_the_data() -> None:
    config = load_config(None, ["stage1.global_batch_groups=64"])
    check_config(config, num_groups=64)
    with pytest.raises(ConfigError, match="larger than the 63 text groups"):
        check_config(config, num_groups=63)


def test_precision_resolution() -> None:
    assert loop.resolve_precision("auto", use_gpu=False) == "fp32"
    assert loop.resolve_precision("auto", use_gpu=True) == "bf16"
    with pytest.raises(ValueError, match="needs GPUs"):
        loop.resolve_precision("bf16", use_gpu=False)


def test_model_family_choices_match_the_registry() -> None:
    import typing

    from pipeline.config import ModelConfig
    from pipeline.models import known_families

    allowed = typing.get_args(typing.get_type_hints(ModelConfig)["family"])
    assert set(allowed) == {"", *known_families()}


# -- similarity agreement --------------------------------------------------------------------------
def test_similarity_agreement() -> None:
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((30, 16))
    rotated = teacher @ np.linalg.qr(rng.standard_normal((16, 16)))[0]  # same cosines
    assert similarity_agreement(rotated * 3.0, teacher) == pytest.approx(1.0)
    assert abs(similarity_agreement(rng.standard_normal((30, 8)), teacher)) < 0.2
    np.testing.assert_allclose(_average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0, 2.5, 1])
    # By hand: 3 texts, 3 pairs (0,1), (0,2), (1,2). Teacher at angles 0, 10, 90 degrees:
    # cosines .985, 0, .174 -> ranks 2, 0, 1. Student at 0, 90, 100: 0, -.174, .985 -> 1, 0, 2.
    # Pearson of the ranks: deviations (1, -1, 0) and (0, -1, 1) -> 1 / sqrt(2 * 2) = 0.5.
    def at(degrees: list[float]) -> np.ndarray:
        radians = np.radians(degrees)
        return np.stack([np.cos(radians), np.sin(radians)], axis=1)

    assert similarity_agreement(at([0, 90, 100]), at([0, 10, 90])) == pytest.approx(0.5)


def test_stage1_job_rejects_a_bad_config_before_starting_ray() -> None:
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "jobs/stage1.py", "--config", "jobs/configs/demo.yaml",
                           "stage1.global_batch_groups=33"], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "stage1.global_batch_groups=33 is not a multiple of train.num_workers=2" in done.stderr
    assert "starting local Ray" not in done.stderr


def test_stage1_keeps_the_vision_tower_frozen_and_in_eval_mode(tmp_path) -> None:
    from pipeline.models import build_tiny_model, resolve_path
    from pipeline.models.student import StudentSource
    from pipeline.train.stage1 import Stage1Spec

    path = build_tiny_model("llava_next", tmp_path / "tiny", vocab_texts=["a red circle"])
    config = load_config(None, ["stage1.lora.rank=2"])
    settings = loop.LoopSettings(stage="stage1", stage_dir=str(tmp_path), train=config.train,
                                 optim=None, global_batch_rows=2, row_keys=("a", "b"),  # type: ignore[arg-type]
                                 precision="fp32", use_gpu=False)
    spec = Stage1Spec(settings, student=StudentSource(path, "", False), config=config,
                      texts_per_group=3, probe_texts=[])
    model = spec.load_student(dtype=torch.float32, device="cpu")
    again = spec.load_student(dtype=torch.float32, device="cpu")
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: LoRA init must depend on the seed only"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    spec.set_train_mode(model)
    spec.check_frozen(model)
    assert resolve_path(model.model, "model.language_model").training
    model.train()  # e.g. engine.train() without the stage's train mode
    with pytest.raises(FrozenParameterError, match="model.vision_tower is in train mode"):
        spec.check_frozen(model)
    spec.set_train_mode(model)
    next(resolve_path(model.model, "model.multi_modal_projector").parameters()).requires_grad_()
    with pytest.raises(FrozenParameterError, match="vision tower or projector trains"):
        spec.check_frozen(model)


def test_step_metrics_count_the_time_spent_on_data() -> None:
    """samples/s and tokens/s are over the step's wall time (data wait included), not over
    the compute alone; the parts are kept beside it."""
    from pipeline.train.loop import StepBatch, with_data_time

    batch = StepBatch(chunks=[], loss_fn=lambda emb: emb.sum(), num_samples=64,
                      num_tokens=6400, prepare_s=0.3)
    compute = {"loss": 1.0, "samples_per_s": 64 / 0.2, "tokens_per_s": 6400 / 0.2,
               "step_s": 0.2}
    row = with_data_time(compute, batch, wait_s=0.05, wall_s=0.25)
    assert row["step_s"] == 0.25 and row["compute_s"] == 0.2
    assert row["data_wait_s"] == 0.05 and row["prepare_s"] == 0.3
    assert row["samples_per_s"] == pytest.approx(64 / 0.25)
    assert row["tokens_per_s"] == pytest.approx(6400 / 0.25)
    assert row["loss"] == 1.0
