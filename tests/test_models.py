"""Models: prompts per family, tiny backbones, Embedder invariants, Teacher parity."""
from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from pipeline.models import (
    IMAGE_PLACEHOLDER,
    META_FILE,
    PACKAGED_MINILM,
    Embedder,
    RemoteCodeRequiredError,
    Teacher,
    build_tiny_model,
    detect_family,
    format_text,
    freeze_vision,
    get_backbone,
    load_backbone,
    lora_target_regex,
    resolve_path,
)
from pipeline.models.tiny import HIDDEN_SIZE, NUM_LAYERS

FAMILIES = ["llava_next", "qwen2_vl"]
if hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    FAMILIES.append("qwen2_5_vl")

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


# ---------------------------------------------------------------------------------------
# Helpers and fixtures


def shape_image(color: str, size: tuple[int, int] = (48, 48), shape: str = "ellipse"
                ) -> Image.Image:
    image = Image.new("RGB", size, "white")
    getattr(ImageDraw.Draw(image), shape)([4, 4, size[0] - 6, size[1] - 6], fill=color)
    return image


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family, vocab_texts=["a red circle"])
            for family in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def embedder(tiny_dirs: dict[str, str], family: str) -> Embedder:
    return Embedder.from_pretrained(tiny_dirs[family])


def mixed_rows() -> tuple[list[str], list[object]]:
    texts = ["a red circle",
             IMAGE_PLACEHOLDER,
             "two blue squares on the left side of the picture, far away from the center",
             f"{IMAGE_PLACEHOLDER}\nWhat colour is the shape?",
             "one",
             IMAGE_PLACEHOLDER]
    images = [None, png_bytes(shape_image("red")), None,
              shape_image("blue", (40, 56), "rectangle"), None,
              shape_image("green", (64, 64))]
    return texts, images


# ---------------------------------------------------------------------------------------
# Registry and prompts


@pytest.mark.parametrize(("family", "text_prompt", "image_prompt", "instruction"), [
    ("llava_next",
     "[INST] a dog\nSummary above sentence in one word: [/INST]",
     "[INST] <image>\nSummary above image in one word: [/INST]",
     "[INST] <image>\nRepresent the given image. [/INST]"),
    ("phi3_v",
     "<|user|>\na dog\nSummary above sentence in one word:<|end|>\n<|assistant|>\n",
     "<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n",
     "<|user|>\n<|image_1|>\nRepresent the given image.<|end|>\n<|assistant|>\n"),
    ("qwen2_vl",
     "<|im_start|>user\na dog\nSummary above sentence in one word:<|im_end|>\n"
     "<|im_start|>assistant\n",
     f"<|im_start|>user\n{QWEN_IMAGE}\nSummary above image in one word:<|im_end|>\n"
     "<|im_start|>assistant\n",
     f"<|im_start|>user\n{QWEN_IMAGE}\nRepresent the given image.<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("qwen2_5_vl",
     "<|im_start|>user\na dog\nSummary above sentence in one word:<|im_end|>\n"
     "<|im_start|>assistant\n",
     f"<|im_start|>user\n{QWEN_IMAGE}\nSummary above image in one word:<|im_end|>\n"
     "<|im_start|>assistant\n",
     f"<|im_start|>user\n{QWEN_IMAGE}\nRepresent the given image.<|im_end|>\n"
     "<|im_start|>assistant\n"),
])
def test_prompts_exact(family: str, text_prompt: str, image_prompt: str,
                       instruction: str) -> None:
    spec = get_backbone(family)
    assert format_text(spec, "a dog", has_image=False, mode="one_word") == text_prompt
    assert format_text(spec, IMAGE_PLACEHOLDER, has_image=True, mode="one_word") == image_prompt
    canonical = f"{IMAGE_PLACEHOLDER}\nRepresent the given image."
    assert format_text(spec, canonical, has_image=True, mode="instruction") == instruction


def test_placeholder_replacement_and_errors() -> None:
    spec = get_backbone("llava_next")
    query = f"{IMAGE_PLACEHOLDER} Represent the given image with the following question: why?"
    assert format_text(spec, query, has_image=True, mode="raw") == (
        "<image> Represent the given image with the following question: why?")
    assert format_text(spec, "what colour?", has_image=True, mode="one_word") == (
        "[INST] <image>\nwhat colour?\nSummary above image and sentence in one word: [/INST]")
    # an image row without placeholder gets one in front, as the data layer does
    assert format_text(spec, "caption", has_image=True, mode="raw") == "<image>\ncaption"
    with pytest.raises(ValueError, match="has_image=False"):
        format_text(spec, IMAGE_PLACEHOLDER, has_image=False)
    with pytest.raises(ValueError, match="at most one image"):
        format_text(spec, IMAGE_PLACEHOLDER * 2, has_image=True)
    with pytest.raises(ValueError, match="prompt mode"):
        format_text(spec, "x", has_image=False, mode="chat")  # type: ignore[arg-type]


def test_unknown_family_lists_known() -> None:
    with pytest.raises(ValueError, match="llava_next.*qwen2_vl.*phi3_v"):
        get_backbone("blip2")


def test_phi3_v_gates(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="remote code"):
        build_tiny_model("phi3_v", tmp_path / "phi")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3_v"}))
    assert detect_family(tmp_path) == "phi3_v"
    with pytest.raises(RemoteCodeRequiredError, match="model.trust_remote_code"):
        load_backbone(tmp_path)
    with pytest.raises(RemoteCodeRequiredError, match="model.trust_remote_code"):
        Embedder.from_pretrained(tmp_path)


def test_family_from_config_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert detect_family(tmp_path) == "qwen2_vl"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="no backbone family"):
        detect_family(tmp_path)


# ---------------------------------------------------------------------------------------
# Tiny backbones and the Embedder


def test_tiny_folder_and_meta(tiny_dirs: dict[str, str], family: str) -> None:
    folder = Path(tiny_dirs[family])
    assert (folder / "model.safetensors").exists()
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["family"] == family and meta["pooling"] == "last_token"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [get_backbone(family).model_class]


def test_forward_text_and_image_rows(embedder: Embedder) -> None:
    for texts, images in ((["a red circle", "one blue square"], None),
                          ([IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER],
                           [shape_image("red"), png_bytes(shape_image("blue"))])):
        emb = embedder(**embedder.prepare(texts, images))
        assert emb.shape == (2, HIDDEN_SIZE) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
        assert (emb[0] - emb[1]).abs().max() > 1e-3  # different inputs, different vectors


def test_last_token_pooling_matches_reference(embedder: Embedder) -> None:
    """Unpadded HF forward of the formatted prompt: normalised last position, last layer."""
    spec = embedder.spec
    prompt = format_text(spec, "a red circle", has_image=False, mode="one_word")
    ids = embedder.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = resolve_path(embedder.model, spec.core_path)(input_ids=ids).last_hidden_state
        reference = torch.nn.functional.normalize(hidden[:, -1], dim=-1)  # (1, D)
        emb = embedder.encode(["a red circle", "a much longer text about many blue squares"])
    assert (emb[:1] - reference).abs().max().item() < 1e-6


def test_image_content_matters(embedder: Embedder) -> None:
    emb = embedder.encode(images=[shape_image("red"), shape_image("red"),
                                  shape_image("blue", shape="rectangle")])
    assert torch.equal(emb[0], emb[1])
    assert (emb[0] - emb[2]).abs().max() > 1e-3


def test_batch_independence_mixed(embedder: Embedder) -> None:
    texts, images = mixed_rows()
    for mode in ("one_word", "instruction"):
        batch = embedder.prepare(texts, images, mode=mode)
        assert batch["attention_mask"][:, 0].min() == 0  # padding really happened
        with torch.no_grad():
            together = embedder(**batch)
            alone = torch.cat([embedder(**embedder.prepare([t], [i], mode=mode))
                               for t, i in zip(texts, images, strict=True)])
        assert (together - alone).abs().max().item() < 1e-5
        encoded = embedder.encode(texts, images, batch_size=4, mode=mode)  # sorted batches
        assert (encoded - alone).abs().max().item() < 1e-5


def test_prompt_mode_changes_embedding(embedder: Embedder) -> None:
    one_word = embedder.encode(["a red circle"], mode="one_word")
    raw = embedder.encode(["a red circle"], mode="raw")
    assert (one_word - raw).abs().max() > 1e-3


def test_save_load_round_trip(embedder: Embedder, tmp_path: Path) -> None:
    texts, images = mixed_rows()
    before = embedder.encode(texts, images)
    embedder.prompt_mode = "instruction"
    try:
        embedder.save_pretrained(tmp_path / "export")
    finally:
        embedder.prompt_mode = "one_word"
    loaded = Embedder.from_pretrained(tmp_path / "export")
    assert loaded.spec.family == embedder.spec.family and loaded.prompt_mode == "instruction"
    after = loaded.encode(texts, images, mode="one_word")
    assert (before - after).abs().max().item() < 1e-6


def test_s3_uri_goes_through_storage(tiny_dirs: dict[str, str], family: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake = types.ModuleType("pipeline.download_cache")
    fake.download_to_cache = lambda uri: calls.append(uri) or tiny_dirs[family]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pipeline.download_cache", fake)
    loaded = Embedder.from_pretrained(f"s3://models/{family}")
    assert calls == [f"s3://models/{family}"] and loaded.spec.family == family


def test_forward_rejects_right_padding(embedder: Embedder) -> None:
    batch = embedder.prepare(["a", "a much longer red circle text"])
    batch = {k: v.flip(-1) if k == "attention_mask" else v for k, v in batch.items()}
    with pytest.raises(ValueError, match="left-padded"):
        embedder(**batch)


def test_image_count_mismatch_is_an_error(embedder: Embedder) -> None:
    spec = embedder.spec
    with pytest.raises(ValueError, match="row 0"):
        embedder.inputs([f"x {spec.image_placeholder}"], [None])


def test_vision_paths_and_lora_targets(tiny_dirs: dict[str, str], family: str) -> None:
    from peft import LoraConfig, get_peft_model

    spec = get_backbone(family)
    model, _, _ = load_backbone(tiny_dirs[family])
    lm = resolve_path(model, spec.language_model_path)
    assert isinstance(lm, torch.nn.Module)
    vision = [resolve_path(model, path) for path in spec.vision_paths]
    assert all(isinstance(v, torch.nn.Module | torch.nn.Parameter) for v in vision)
    assert freeze_vision(model, spec) > 0
    assert not any(p.requires_grad for v in vision for p in
                   (v.parameters() if isinstance(v, torch.nn.Module) else [v]))
    assert any(isinstance(v, torch.nn.Module) and not v.training for v in vision)

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_regex(spec)))
    lora = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(lora) == NUM_LAYERS * len(spec.lora_target_modules)
    assert all(f".{spec.language_model_path}." in name for name in lora)
    assert not any(f".{path}." in name for name in lora for path in spec.vision_paths)
    assert resolve_path(peft_model, spec.language_model_path) is lm  # unwraps PEFT


def test_lora_over_whole_mllm_reaches_vision(tiny_dirs: dict[str, str], family: str,
                                             tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    embedder = Embedder.from_pretrained(tiny_dirs[family])
    spec = embedder.spec
    regex = lora_target_regex(spec, include_vision=True)
    embedder.model = get_peft_model(embedder.model, LoraConfig(r=4, target_modules=regex))
    lora = [name for name, module in embedder.model.named_modules() if hasattr(module, "lora_A")]
    assert any(f".{spec.vision_paths[0]}." in name for name in lora)
    assert sum(f".{spec.language_model_path}." in name for name in lora) == (
        NUM_LAYERS * len(spec.lora_target_modules))
    # the Embedder's forward runs through the injected adapters
    texts, images = mixed_rows()
    embedder(**embedder.prepare(texts, images))[:, 0].sum().backward()
    lora_b_grads = [p.grad for name, p in embedder.model.named_parameters()
                    if "lora_B" in name and p.grad is not None]
    assert lora_b_grads and any(g.abs().sum() > 0 for g in lora_b_grads)
    with pytest.raises(ValueError, match="merge_lora"):
        embedder.save_pretrained(tmp_path / "unmerged")
    with torch.no_grad():  # non-zero adapters, so merging has something to fold in
        for name, param in embedder.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    before = embedder.encode(texts, images)
    embedder.merge_lora()
    assert not hasattr(embedder.model, "peft_config")
    loaded = Embedder.from_pretrained(embedder.save_pretrained(tmp_path / "merged"))
    assert (loaded.encode(texts, images) - before).abs().max().item() < 1e-5


def test_training_path_has_gradients(tiny_dirs: dict[str, str], family: str) -> None:
    embedder = Embedder.from_pretrained(tiny_dirs[family])
    texts, images = mixed_rows()
    emb = embedder(**embedder.prepare(texts, images))
    (emb[:, 0].sum() + emb[:, 1].sum()).backward()
    spec = embedder.spec
    lm_grads = [p.grad for p in resolve_path(embedder.model, spec.language_model_path)
                .parameters() if p.grad is not None]
    assert lm_grads and all(torch.isfinite(g).all() for g in lm_grads)
    assert any(g.abs().sum() > 0 for g in lm_grads)


def test_encode_keeps_frozen_tower_in_eval(tiny_dirs: dict[str, str], family: str) -> None:
    embedder = Embedder.from_pretrained(tiny_dirs[family])
    embedder.train()
    freeze_vision(embedder.model, embedder.spec)
    embedder.encode(["a red circle"], batch_size=1)
    lm = resolve_path(embedder.model, embedder.spec.language_model_path)
    tower = resolve_path(embedder.model, embedder.spec.vision_paths[0])
    assert embedder.training and lm.training and not tower.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu_by_default(tiny_dirs: dict[str, str], family: str) -> None:
    embedder = Embedder.from_pretrained(tiny_dirs[family])
    assert embedder.dtype == torch.bfloat16 and embedder.device.type == "cuda"
    texts, images = mixed_rows()
    emb = embedder.encode(texts, images)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(texts)))


# ---------------------------------------------------------------------------------------
# Teacher


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return Teacher(PACKAGED_MINILM, device="cpu")


def test_teacher_matches_sentence_transformers(teacher: Teacher) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["A man is playing a guitar.", "A red circle on the left.", "Nobody is here."]
    reference = SentenceTransformer(str(teacher.path), device="cpu").encode(
        texts, normalize_embeddings=True)
    emb = teacher.encode(texts, batch_size=2)
    assert emb.dtype == np.float32 and emb.shape == (3, teacher.dim) and teacher.dim == 384
    cosine = (emb * reference).sum(axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_teacher_prefix_changes_vectors(teacher: Teacher) -> None:
    prefixed = Teacher(teacher.path, device="cpu",
                       prefix="Instruct: Retrieve semantically similar text.\nQuery: ")
    texts = ["A man is playing a guitar."]
    assert float((teacher.encode(texts) * prefixed.encode(texts)).sum()) < 0.999


def test_teacher_counts_truncated(teacher: Teacher) -> None:
    long_text = " ".join(["word"] * (teacher.max_seq_length + 10))
    assert teacher.count_truncated(["short text", long_text, "another"]) == 1
    assert teacher.encode([]).shape == (0, 384)
