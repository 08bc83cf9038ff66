"""An exported folder loads three ways with the trained vectors: ``Embedder.from_pretrained``,
``SentenceTransformer(path)`` (modules.json: last-token pooling, normalisation, prompts through
the processor's chat template) and plain transformers as the model card spells it out; and
``AutoProcessor.from_pretrained(path)`` is complete. Per tiny family, exported the way the
export step does (``export_and_check``). Without torchvision, Qwen's processor (hence
AutoProcessor and sentence-transformers) cannot load: those checks skip with that reason."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw
from transformers.utils.chat_template_utils import render_jinja_template

from pipeline.data.schemas import IMAGE_PLACEHOLDER
from pipeline.eval.sets import CAPTION_PREFIX
from pipeline.models import Embedder, build_tiny_model, format_text, get_backbone, known_families
from pipeline.models.card import model_card, transformers_snippet
from pipeline.models.export import (
    Source,
    check_loaders,
    export_and_check,
    sentence_transformers_inputs,
)
from pipeline.models.inputs import auto_loader_blocker, processor_class
from pipeline.models.registry import PROMPT_MODES, chat_template
from pipeline.train.checkpoint import ExportMismatchError

MIN_COSINE = 0.9999
# (family, prompt mode stored in the folder)
EXPORTS = [("llava_next", "one_word"), ("llava_next", "instruction"), ("qwen2_vl", "one_word")]
if hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    EXPORTS.append(("qwen2_5_vl", "instruction"))
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling/config.json", "2_Normalize/config.json")


def shape_image(color: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse([4, 4, size[0] - 6, size[1] - 6], fill=color)
    return image


IMAGES = [shape_image("red", (48, 40)), shape_image("blue", (64, 32)), shape_image("green", (33, 50))]
# Rows per input kind: (texts, images) as Embedder.encode takes them.
KINDS = {
    "text": (["a red circle", "two blue squares on the left side of the picture", "one"],
             [None, None, None]),
    "image": ([IMAGE_PLACEHOLDER] * 3, IMAGES),
    "image+text": (["What colour is the shape?", f"{IMAGE_PLACEHOLDER}\nWhich shape is it?",
                    f"the {IMAGE_PLACEHOLDER} above"], IMAGES),
}


@dataclass(frozen=True)
class Exported:
    family: str
    prompt_mode: str
    path: Path
    manifest: dict

    @property
    def blocker(self) -> str | None:
        return auto_loader_blocker(get_backbone(self.family))


@pytest.fixture(scope="module", params=EXPORTS, ids=[f"{f}-{m}" for f, m in EXPORTS])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Exported:
    """A tiny model saved with a prompt mode (a plain source folder), then exported."""
    family, mode = request.param
    root = tmp_path_factory.mktemp(f"{family}-{mode}")
    embedder = Embedder.from_pretrained(build_tiny_model(family, root / "tiny"), device="cpu")
    embedder.prompt_mode = mode
    source = Source(embedder.save_pretrained(root / "source"), None, None, None)
    dest = root / "export"

    def card(family: str, prompt_mode: str, dtype: str) -> str:
        return model_card(family=family, prompt_mode=prompt_mode, dtype=dtype,
                          destination=str(dest), source=source, run_name="test",
                          stage_manifests={}, report=None)

    manifest = export_and_check(source, str(dest), requested_dtype="auto",
                                trust_remote_code=False, card=card)
    return Exported(family, mode, dest, manifest)


@pytest.fixture(scope="module")
def reference(exported: Exported) -> dict[str, torch.Tensor]:
    """Embedder vectors of every kind, in the folder's prompt mode."""
    embedder = Embedder.from_pretrained(exported.path, device="cpu")
    return {kind: embedder.encode(texts, images) for kind, (texts, images) in KINDS.items()}


def needs_auto_loaders(exported: Exported) -> None:
    if exported.blocker:
        pytest.skip(exported.blocker)


def st_model(path: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def cosines(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(torch.as_tensor(emb).float(), ref, dim=-1)  # (N,)


# ---------------------------------------------------------------------------------------
# The chat template is format_text


@pytest.mark.parametrize("family", known_families())
def test_chat_template_renders_format_text_for_every_mode_and_row(family):
    spec = get_backbone(family)
    rows = [("a red circle", False), ("", True), (IMAGE_PLACEHOLDER, True),
            (f"{IMAGE_PLACEHOLDER}\nWhat colour?", True), ("  What colour?  ", True),
            (f"left {IMAGE_PLACEHOLDER} right", True), ("braces {text} {image}", False),
            ("braces {text} {image}", True)]
    for default in PROMPT_MODES:
        template = chat_template(spec, default)
        for mode in PROMPT_MODES:
            for text, has_image in rows:
                content = [{"type": "image"}] * has_image + [{"type": "text", "text": text}]
                extra = {} if mode == default else {"prompt_mode": mode}
                (got,), _ = render_jinja_template(
                    conversations=[[{"role": "user", "content": content}]],
                    chat_template=template, **extra)
                assert got == format_text(spec, text, has_image=has_image, mode=mode)
    # A system message (sentence-transformers' prompt) goes in front of the text.
    (got,), _ = render_jinja_template(conversations=[[
        {"role": "system", "content": [{"type": "text", "text": "Find: "}]},
        {"role": "user", "content": [{"type": "text", "text": "a dog"}]}]],
        chat_template=chat_template(spec, "instruction"))
    assert got == format_text(spec, "Find: a dog", has_image=False, mode="instruction")


@pytest.mark.parametrize("content", [[{"type": "image"}, {"type": "image"}],
                                     [{"type": "text", "text": IMAGE_PLACEHOLDER}],
                                     [{"type": "video"}]])
def test_chat_template_refuses_rows_the_pipeline_refuses(content):
    with pytest.raises(Exception, match="a row holds"):
        render_jinja_template(conversations=[[{"role": "user", "content": content}]],
                              chat_template=chat_template(get_backbone("llava_next")))


# ---------------------------------------------------------------------------------------
# The exported folder


def test_processor_config_and_st_files_carry_the_settings(exported):
    spec, path = get_backbone(exported.family), exported.path
    config = transformers.AutoConfig.from_pretrained(path)
    processor = json.loads((path / "processor_config.json").read_text())
    assert processor["processor_class"] == processor_class(spec)
    assert (path / "chat_template.jinja").read_text() == chat_template(spec, exported.prompt_mode)
    assert json.loads((path / "tokenizer_config.json").read_text())["padding_side"] == "left"
    if exported.family == "llava_next":
        assert processor["patch_size"] == config.vision_config.patch_size
        assert processor["vision_feature_select_strategy"] == config.vision_feature_select_strategy
        assert processor["num_additional_image_tokens"] == 1
        assert processor["image_token"] == spec.image_token
        assert processor["image_processor"]["image_grid_pinpoints"]
    else:
        for key, name in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                          ("temporal_patch_size", "temporal_patch_size")):
            assert processor["image_processor"][key] == getattr(config.vision_config, name)
            assert processor["video_processor"][key] == processor["image_processor"][key]
        assert processor["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling",
                                                              "Normalize"]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "lasttoken"
    assert pooling["embedding_dimension"] == exported.manifest["embedding_dim"]


def test_auto_processor_builds_the_pipeline_inputs(exported):
    needs_auto_loaders(exported)
    processor = transformers.AutoProcessor.from_pretrained(exported.path)
    embedder = Embedder.from_pretrained(exported.path, device="cpu")
    texts, images = KINDS["image+text"]
    conversations = [[{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": texts[0]}]}]]
    got = processor(text=processor.apply_chat_template(conversations), images=images[:1],
                    return_tensors="pt")
    want = embedder.prepare(texts[:1], images[:1])
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.allclose(got["pixel_values"], want["pixel_values"])


def test_sentence_transformers_gives_the_embedder_vectors(exported, reference):
    needs_auto_loaders(exported)
    model = st_model(exported.path)
    for kind, (texts, images) in KINDS.items():
        emb = model.encode(sentence_transformers_inputs(texts, images), convert_to_tensor=True)
        assert cosines(emb, reference[kind]).min() >= MIN_COSINE, kind
    # One batch of every kind at once (sorted by length inside sentence-transformers).
    mixed = [KINDS[kind][0][i] for kind in KINDS for i in range(2)], [
        KINDS[kind][1][i] for kind in KINDS for i in range(2)]
    want = torch.cat([reference[kind][:2] for kind in KINDS])
    emb = model.encode(sentence_transformers_inputs(*mixed), convert_to_tensor=True)
    assert cosines(emb, want).min() >= MIN_COSINE


def test_card_snippet_gives_the_embedder_vectors(exported, reference):
    needs_auto_loaders(exported)
    snippet = transformers_snippet(str(exported.path))
    assert snippet.rstrip() in (exported.path / "README.md").read_text()
    namespace: dict = {}
    exec(compile(snippet, "model-card-snippet", "exec"), namespace)  # noqa: S102
    for kind, (texts, images) in KINDS.items():
        emb = namespace["embed"](list(zip(texts, images, strict=True)))
        assert cosines(emb, reference[kind]).min() >= MIN_COSINE, kind


def test_without_the_st_files_sentence_transformers_is_wrong(exported, reference, tmp_path):
    needs_auto_loaders(exported)
    bare = tmp_path / "bare"
    shutil.copytree(exported.path, bare)
    for name in ST_FILES:
        (bare / name).unlink()
    texts, images = KINDS["text"]
    emb = st_model(bare).encode(sentence_transformers_inputs(texts, images),
                                convert_to_tensor=True)
    assert cosines(emb, reference["text"]).max() < 0.9  # mean pooling, not normalised


def test_check_loaders_reports_every_loader_and_kind(exported):
    result = check_loaders(exported.path, device="cpu")
    assert result["rows"] == {"text": 2, "image": 1, "image+text": 2}
    assert result["threshold"] == MIN_COSINE
    if exported.blocker:
        assert result["skipped"] == {"sentence_transformers": exported.blocker,
                                     "transformers": exported.blocker}
        assert set(result["min_cosine"]) == {"embedder"}
    else:
        assert result["skipped"] == {}
        assert set(result["min_cosine"]) == {"embedder", "sentence_transformers", "transformers"}
    assert min(result["min_cosine"].values()) >= MIN_COSINE


def test_check_loaders_fails_when_the_st_pooling_is_wrong(exported, tmp_path):
    needs_auto_loaders(exported)
    if exported.prompt_mode != "one_word":
        pytest.skip("one broken folder is enough")
    broken = tmp_path / "broken"
    shutil.copytree(exported.path, broken)
    pooling = broken / "1_Pooling" / "config.json"
    pooling.write_text(pooling.read_text().replace('"lasttoken"', '"mean"'))
    with pytest.raises(ExportMismatchError, match="sentence_transformers") as err:
        check_loaders(broken, device="cpu")
    assert "'transformers'" not in str(err.value).split("do not reproduce")[0]


def test_prompt_modes_and_named_prompts_through_sentence_transformers(exported):
    needs_auto_loaders(exported)
    if exported.prompt_mode != "instruction":
        pytest.skip("the named prompts are those of instruction mode")
    model, embedder = st_model(exported.path), Embedder.from_pretrained(exported.path)
    texts = KINDS["text"][0]
    emb = model.encode(texts, prompt_name="caption_query", convert_to_tensor=True)
    want = embedder.encode([CAPTION_PREFIX["instruction"] + t for t in texts])
    assert cosines(emb, want).min() >= MIN_COSINE
    emb = model.encode(texts, convert_to_tensor=True,
                       processing_kwargs={"chat_template": {"prompt_mode": "one_word"}})
    assert cosines(emb, embedder.encode(texts, mode="one_word")).min() >= MIN_COSINE
    assert cosines(emb, embedder.encode(texts)).max() < MIN_COSINE  # the mode matters
    # Every loader takes the mode per call (the Embedder's one_word vectors as reference).
    result = check_loaders(exported.path, mode="one_word", device="cpu")
    assert set(result["min_cosine"]) == {"embedder", "sentence_transformers", "transformers"}


def test_card_says_how_to_load_it_elsewhere(exported):
    card = (exported.path / "README.md").read_text()
    for expected in ("SentenceTransformer(", "last-token Pooling", "prompt_mode",
                     "AutoProcessor.from_pretrained", "AutoModel.from_pretrained",
                     "Not expressible", "lm_head.weight"):
        assert expected in card, expected
    assert ("`caption_query`" in card) == (exported.prompt_mode == "instruction")
    assert ("torchvision" in card) == exported.family.startswith("qwen")


def test_card_states_epochs_trained_and_skips_all_dash_metrics() -> None:
    """Stage 2 ran 660 steps of 4 per epoch: the card says 165 epochs and marks the config's
    epochs unused; a headline metric no model has (all dashes) gets no row."""
    from pipeline.models.card import eval_lines, training_lines
    from pipeline.models.export import Source

    manifest = {"steps": 660, "steps_per_epoch": 4, "first_loss": 6.0, "final_loss": 2.2,
                "config": {"stage2": {"epochs": 1, "steps": 660, "batching": "per_dataset"}}}
    card = "\n".join(training_lines(Source("/m", "stage2", manifest, None),
                                    {"stage2": manifest}))
    assert "stage2: 660 steps, loss 6.0000 -> 2.2000 (165 epochs of 4 steps)" in card
    assert "epochs=1 (unused: steps=660 set the schedule)" in card
    report = {"results": {"m": {"mmeb": {"overall_mean_of_datasets": 41.7,
                                         "overall_mean_of_metatasks": None}}},
              "models": {"m": {"path": "/m"}}}
    table = "\n".join(eval_lines(report, "/m"))
    assert "overall_mean_of_datasets | 41.70" in table
    assert "overall_mean_of_metatasks" not in table


# ---------------------------------------------------------------------------------------
# Hugging Face metadata and vLLM settings

# Architectures vLLM's model registry serves for these families (its pooling runner converts
# them with --convert embed); the exported config.json must name one of them.
VLLM_ARCHITECTURES = {"llava_next": "LlavaNextForConditionalGeneration",
                      "qwen2_vl": "Qwen2VLForConditionalGeneration",
                      "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def card_metadata(card: str) -> dict:
    import yaml

    assert card.startswith("---\n"), card[:40]
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep, "no closing --- of the front matter"
    return yaml.safe_load(head)


def test_card_front_matter_has_the_hub_fields_and_this_models_numbers() -> None:
    from huggingface_hub import ModelCard

    from pipeline.models.card import CardMeta

    report = {"results": {
        "base": {"mmeb": {"overall_mean_of_datasets": 3.7, "VOC2007": 5.0}},
        "stage2": {"mmeb": {"overall_mean_of_datasets": 41.6617, "overall_mean_of_metatasks": None,
                            "VOC2007": 60.0},
                   "retrieval": {"t2i_R@1": 22.25, "i2t_R@10": 70.0, "t2i_R@5": None},
                   "sugarcrepe": {"mean": 71.79, "replace_att": 70.0}}},
        "models": {"base": {"path": "tiny:llava_next"}, "stage2": {"path": "/runs/x/stage2/model"}}}
    meta = CardMeta(base_model="llava-hf/llava-v1.6-mistral-7b-hf", license="apache-2.0",
                    datasets=("TIGER-Lab/MMEB-train",))
    card = model_card(family="llava_next", prompt_mode="instruction", dtype="float32",
                      destination="/out", source=Source("/runs/x/stage2/model", None, None, None),
                      run_name="demo-abc", stage_manifests={}, report=report, meta=meta)
    data = card_metadata(card)
    assert data["library_name"] == "sentence-transformers"
    assert data["pipeline_tag"] == "feature-extraction"
    assert data["base_model"] == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["TIGER-Lab/MMEB-train"]
    assert {"sentence-transformers", "llava_next"} <= set(data["tags"])
    (entry,) = data["model-index"]
    assert entry["name"] == "demo-abc"
    got = {(r["dataset"]["name"], m["name"]): (m["type"], m["value"])
           for r in entry["results"] for m in r["metrics"]}
    # This model's headline numbers only (not the base model's, not per dataset, no nulls).
    assert got == {("mmeb", "overall_mean_of_datasets"): ("precision_at_1", 41.6617),
                   ("retrieval", "t2i_R@1"): ("recall_at_1", 22.25),
                   ("retrieval", "i2t_R@10"): ("recall_at_10", 70.0),
                   ("sugarcrepe", "mean"): ("accuracy", 71.79)}
    # The Hub's own parser reads the same results.
    parsed = ModelCard(card).data
    assert parsed.library_name == "sentence-transformers"
    assert sorted(r.metric_value for r in parsed.eval_results) == [22.25, 41.6617, 70.0, 71.79]


def test_card_front_matter_without_a_report_or_base_model() -> None:
    card = model_card(family="qwen2_vl", prompt_mode="one_word", dtype="float32",
                      destination="/out", source=Source("/m", None, None, None), run_name="r",
                      stage_manifests={}, report=None)
    data = card_metadata(card)
    assert "model-index" not in data and "base_model" not in data
    assert data["license"] == "other" and data["datasets"] == []


def test_exported_card_front_matter_parses(exported):
    data = card_metadata((exported.path / "README.md").read_text())
    assert data["library_name"] == "sentence-transformers"
    assert exported.family in data["tags"]


def test_vllm_settings_are_the_folders_pooling_and_prompts(exported):
    """vLLM is not installed here: its settings are checked against what the folder holds."""
    from pipeline.models.card import vllm_settings

    spec, path = get_backbone(exported.family), exported.path
    settings = vllm_settings(exported.family, exported.prompt_mode)
    modules = [m["type"].rsplit(".", 1)[1]
               for m in json.loads((path / "modules.json").read_text())]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert settings["pooler_config"] == {"pooling_type": "LAST", "normalize": True}
    assert pooling["pooling_mode"] == "lasttoken" and modules[-1] == "Normalize"
    assert settings["runner"] == "pooling" and settings["convert"] == "embed"
    assert settings["trust_remote_code"] is spec.requires_remote_code
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [VLLM_ARCHITECTURES[exported.family]]
    # The card's serve line carries these settings.
    card = (path / "README.md").read_text()
    pooler = json.dumps(settings["pooler_config"])
    assert (f"vllm serve {path} --runner pooling --convert embed --pooler-config '{pooler}'"
            in card)
    # vLLM hands the chat template image parts as {"type": "image"} (OpenAI content format):
    # with the card's chat_template_kwargs every kind renders the Embedder's prompt, in every mode.
    template = (path / "chat_template.jinja").read_text()
    for mode in PROMPT_MODES:
        kwargs = vllm_settings(exported.family, mode)["chat_template_kwargs"]
        for text, has_image in (("A dog running.", False), ("", True), ("What is it?", True)):
            content = [{"type": "image"}] * has_image + [{"type": "text", "text": text}] * bool(text)
            (got,), _ = render_jinja_template(
                conversations=[[{"role": "user", "content": content}]], chat_template=template,
                **kwargs)
            assert got == format_text(spec, text or IMAGE_PLACEHOLDER * has_image,
                                      has_image=has_image, mode=mode)
