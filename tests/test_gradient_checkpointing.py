"""Activation checkpointing (train.gradient_checkpointing) == the plain gradient.

Tiny backbones with LoRA attached as the stages attach it (stage 1: language model only, text
rows; stage 2: LoRA over the whole MLLM, mixed text and image rows), in train mode with LoRA
dropout on: the loss gradient of every LoRA weight is the same with and without
``Embedder.enable_gradient_checkpointing``, and the layers really recompute in the backward.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers

from pipeline.config import LoraConfig
from pipeline.losses import distillation_loss
from pipeline.models import Embedder, build_tiny_model
from pipeline.train.lora import attach_lora, train_mode
from tests.test_models import mixed_rows

FAMILIES = ["llava_next", "qwen2_vl"]
if hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    FAMILIES.append("qwen2_5_vl")

LORA = LoraConfig(rank=4, alpha=8, dropout=0.1)  # dropout on: the recompute must replay it
TEXT_ROWS = ["a red circle", "two blue squares on the left of the picture", "one",
             "a green triangle above a yellow star"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family, vocab_texts=["a red circle"])
            for family in FAMILIES}


def lora_embedder(folder: str, *, include_vision: bool) -> Embedder:
    """Float32 embedder with LoRA attached as a stage does, in that stage's train mode.

    LoRA weights get a seeded random offset: with PEFT's zero-initialised B every A
    gradient would be 0 and half the comparison empty."""
    embedder = attach_lora(Embedder.from_pretrained(folder, dtype=torch.float32), LORA,
                           include_vision=include_vision, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in embedder.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    train_mode(embedder, vision_frozen=not include_vision)
    return embedder


def part_of(embedder: Embedder, name: str) -> str:
    """'vision' or 'language' for a module or parameter name of ``embedder.model``'s base."""
    name = name.removeprefix("model.base_model.model.")  # a parameter of the PeftModel
    vision = any(name == p or name.startswith(f"{p}.") for p in embedder.spec.vision_paths)
    return "vision" if vision else "language"


def backward_with_recomputes(embedder: Embedder, batch: dict[str, torch.Tensor]
                             ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """LoRA gradients of a stage-1-style loss, and the parts ('language', 'vision') whose
    modules run a forward during the backward pass (= recompute their activations)."""
    base = embedder.model.get_base_model()
    calls: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
             for name, module in base.named_modules()]
    torch.manual_seed(0)  # same LoRA dropout masks in both runs
    emb = embedder(**batch)  # (N, D)
    teacher_emb = torch.randn(emb.shape[0], 24, generator=torch.Generator().manual_seed(2))
    calls.clear()
    distillation_loss(emb, teacher_emb, temperature=0.05).backward()
    for hook in hooks:
        hook.remove()
    grads = {name: param.grad for name, param in embedder.named_parameters()
             if param.requires_grad}
    return grads, {part_of(embedder, name) for name in calls}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_checkpointed_gradient_equals_plain(tiny_dirs: dict[str, str], family: str,
                                            stage: str) -> None:
    include_vision = stage == "stage2"
    texts, images = mixed_rows() if include_vision else (TEXT_ROWS, None)
    plain = lora_embedder(tiny_dirs[family], include_vision=include_vision)
    checkpointed = lora_embedder(tiny_dirs[family], include_vision=include_vision)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.model.get_base_model().is_activation_checkpointing
    assert not plain.model.get_base_model().is_activation_checkpointing
    batch = plain.prepare(texts, images)

    plain_grads, plain_recomputed = backward_with_recomputes(plain, batch)
    grads, recomputed = backward_with_recomputes(checkpointed, batch)

    assert plain_recomputed == set()
    assert recomputed == ({"language", "vision"} if include_vision else {"language"})
    # LLaVA reads the features of CLIP's second-to-last layer: its last layer gets no gradient
    unused = {name for name, grad in plain_grads.items() if grad is None}
    assert set(grads) == set(plain_grads)
    assert {name for name, grad in grads.items() if grad is None} == unused
    assert len(unused) < len(grads) / 4
    trained = {part_of(plain, name) for name, grad in plain_grads.items()
               if grad is not None and grad.abs().max() > 0}
    assert trained == ({"language", "vision"} if include_vision else {"language"})
    for name in set(grads) - unused:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-6, atol=1e-8,
                                   msg=name)


def test_encode_is_unchanged(tiny_dirs: dict[str, str]) -> None:
    embedder = lora_embedder(tiny_dirs["qwen2_vl"], include_vision=True)
    texts, images = mixed_rows()
    before = embedder.encode(texts, images, batch_size=4)
    embedder.enable_gradient_checkpointing()
    torch.testing.assert_close(embedder.encode(texts, images, batch_size=4), before,
                               rtol=0, atol=0)
    assert embedder.training  # encode restored the train mode


def test_the_log_names_the_checkpointed_layers(tiny_dirs: dict[str, str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    embedder = lora_embedder(tiny_dirs["llava_next"], include_vision=True)
    with caplog.at_level("INFO", logger="pipeline.models.embedder"):
        embedder.enable_gradient_checkpointing()
    assert ("activation checkpointing (non-reentrant) on for llava_next: language model "
            "MistralModel x1, MistralDecoderLayer x2; vision CLIPEncoder x1, "
            "CLIPEncoderLayer x2") in caplog.text


@pytest.mark.parametrize("break_model", [
    pytest.param(lambda cls, mp: mp.setattr(cls, "supports_gradient_checkpointing", False),
                 id="unsupported-class"),
    pytest.param(lambda cls, mp: mp.setattr(cls, "_set_gradient_checkpointing",
                                            lambda self, **_: None), id="no-module-flagged"),
])
def test_unsupported_model_names_the_knob_and_family(
        tiny_dirs: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        break_model: Callable[[type, pytest.MonkeyPatch], None]) -> None:
    embedder = lora_embedder(tiny_dirs["qwen2_vl"], include_vision=True)
    break_model(type(embedder.model.get_base_model()), monkeypatch)
    with pytest.raises(ValueError, match=r"train.gradient_checkpointing=true, but the "
                       r"qwen2_vl model \(Qwen2VLForConditionalGeneration\) does not support"):
        embedder.enable_gradient_checkpointing()


def test_without_lora(tiny_dirs: dict[str, str]) -> None:
    embedder = Embedder.from_pretrained(tiny_dirs["llava_next"])
    embedder.enable_gradient_checkpointing()  # a bare HF model (no get_base_model)
    assert embedder.model.is_activation_checkpointing
