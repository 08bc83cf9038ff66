"""The model card (README.md) of an exported folder: Hugging Face metadata (YAML front
matter), what the embedding is, the family's prompts, usage (sentence-transformers, plain
transformers, vLLM), the training that made it and the evaluation numbers of the run."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.data.conventions import IMAGE_PLACEHOLDER
from pipeline.models.export import Source
from pipeline.models.inputs import processor_class
from pipeline.models.loading import sentence_transformers_prompts
from pipeline.models.registry import format_text, get_backbone

PIPELINE_TAG = "feature-extraction"
# metric type (model-index) of a set's headline numbers; retrieval's R@K -> recall_at_K
METRIC_TYPES = {"mmeb": "precision_at_1", "sugarcrepe": "accuracy"}
HEADLINE_METRICS = ("overall_mean_of_metatasks", "overall_mean_of_datasets",
                    "in_distribution_mean", "out_of_distribution_mean", "mean")


@dataclass(frozen=True)
class CardMeta:
    """The card's Hugging Face metadata that a run cannot know (the ``export.*`` knobs)."""

    base_model: str = ""              # Hub id of the student backbone ('' = left out)
    license: str = "other"            # the base model's license id
    datasets: tuple[str, ...] = ()    # Hub ids of the training data


def prompt_examples(family: str) -> list[tuple[str, str]]:
    """(what, final prompt) for the family's one-word and instruction prompts."""
    spec = get_backbone(family)
    rows = [
        ("one_word, text", "A dog running on the beach.", False, "one_word"),
        ("one_word, image", IMAGE_PLACEHOLDER, True, "one_word"),
        ("one_word, image + text", f"{IMAGE_PLACEHOLDER}\nA dog running on the beach.", True,
         "one_word"),
        ("instruction, text", "Find me an everyday image that matches the given caption: "
         "A dog running on the beach.", False, "instruction"),
        ("instruction, image", f"{IMAGE_PLACEHOLDER} Represent the given image with the "
         "following question: What is the dog doing?", True, "instruction"),
    ]
    return [(what, format_text(spec, text, has_image=has_image, mode=mode))
            for what, text, has_image, mode in rows]


def transformers_snippet(destination: str) -> str:
    """The card's plain-transformers recipe (no pipeline code); the tests run it."""
    return f'''import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor

path = "{destination}"  # a local folder (download an s3:// prefix first)
processor = AutoProcessor.from_pretrained(path)
model = AutoModel.from_pretrained(path, dtype="auto").eval()  # base model, no LM head


def embed(rows, prompt_mode=None):
    """rows: (text, PIL image or None) pairs -> (N, D) L2-normalised float32 tensor."""
    conversations = [[{{"role": "user", "content": [{{"type": "image"}}] * (image is not None)
                       + [{{"type": "text", "text": text}}]}}] for text, image in rows]
    extra = {{}} if prompt_mode is None else {{"prompt_mode": prompt_mode}}
    prompts = processor.apply_chat_template(conversations, **extra)  # the prompts above
    images = [image for _, image in rows if image is not None]  # one per image row, in order
    batch = processor(text=prompts, images=images or None, padding=True, padding_side="left",
                      return_tensors="pt").to(model.device).to(model.dtype)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, L, D)
    return F.normalize(hidden[:, -1].float(), dim=-1)  # left padding: -1 = last real token
'''


def vllm_settings(family: str, prompt_mode: str) -> dict[str, Any]:
    """How vLLM serves the folder as this embedder: the pooling runner, last-token pooling with
    normalisation (the folder's Pooling + Normalize modules), the chat template's prompt mode."""
    return {"runner": "pooling", "convert": "embed",
            "pooler_config": {"pooling_type": "LAST", "normalize": True},
            "trust_remote_code": get_backbone(family).requires_remote_code,
            "chat_template_kwargs": {"prompt_mode": prompt_mode}}


def vllm_lines(family: str, destination: str, prompt_mode: str) -> list[str]:
    """The card's vLLM usage (documented; its settings are tested against the folder)."""
    settings = vllm_settings(family, prompt_mode)
    pooler = json.dumps(settings["pooler_config"])
    remote = " --trust-remote-code" if settings["trust_remote_code"] else ""
    kwargs = json.dumps(settings["chat_template_kwargs"])
    return [
        "Not run by the export's check (vLLM is not part of this pipeline's install); the "
        "settings are those of the folder's `modules.json` and chat template.", "",
        "```bash",
        f"vllm serve {destination} --runner {settings['runner']} --convert "
        f"{settings['convert']} --pooler-config '{pooler}'{remote}",
        f"# vLLM before 0.10: --task embed --override-pooler-config '{pooler}'",
        "```", "",
        "```python",
        "import base64",
        "",
        "import requests",
        "",
        'image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"',
        '         + base64.b64encode(open("dog.jpg", "rb").read()).decode()}}',
        "",
        "",
        "def embed(content):  # one input per request, as chat messages",
        f'    body = {{"model": "{destination}", "messages": [{{"role": "user", '
        '"content": content}],',
        f'            "chat_template_kwargs": {kwargs}, "encoding_format": "float"}}',
        '    reply = requests.post("http://localhost:8000/v1/embeddings", json=body)',
        '    return reply.json()["data"][0]["embedding"]  # L2-normalised',
        "",
        "",
        'text_emb = embed([{"type": "text", "text": "A dog running on the beach."}])',
        "image_emb = embed([image])",
        'both_emb = embed([image, {"type": "text", "text": "What is the dog doing?"}])',
        "```", "",
        "- `LAST` pooling with `normalize` is the folder's last-token Pooling + Normalize; vLLM "
        "pools each sequence's own last token, so padding does not matter.",
        "- Send every input as `messages`: the chat template builds the prompts above (the "
        "plain `input` field skips it). Offline: `LLM(model=path, runner=\"pooling\", "
        "convert=\"embed\", pooler_config=PoolerConfig(pooling_type=\"LAST\", "
        "normalize=True))` and `llm.embed({\"prompt\": processor.apply_chat_template(...), "
        "\"multi_modal_data\": {\"image\": image}})`.",
    ]


def sentence_transformers_lines(family: str, destination: str, prompt_mode: str) -> list[str]:
    """The card's sentence-transformers usage and what it cannot express."""
    prompts = sentence_transformers_prompts(prompt_mode)
    named = ", ".join(f"`{name}` = {text!r}" for name, text in prompts.items() if text)
    other_mode = "one_word" if prompt_mode == "instruction" else "instruction"
    lines = [
        "```python",
        "from PIL import Image",
        "from sentence_transformers import SentenceTransformer  # >= 6.2",
        "",
        f'model = SentenceTransformer("{destination}")  # a local folder',
        'image = Image.open("dog.jpg").convert("RGB")',
        'emb = model.encode(["A dog running on the beach.",  # text',
        "                   image,  # image",
        '                   {"image": image, "text": "What is the dog doing?"}])  # both',
        "```", "",
        "- Each input gives the vector of `Embedder.encode(texts=[text], images=[image])` "
        "(an image alone: text `<|image_1|>`).",
        "- `modules.json`: Transformer -> last-token Pooling -> Normalize. Every input (text, "
        "image, `{\"image\", \"text\"}` dict, or chat messages) goes through the processor's "
        "chat template (`chat_template.jinja`), which builds the prompts shown above in the "
        "stored mode; inputs are left-padded.",
        "- Another prompt mode for one call: `model.encode(..., processing_kwargs="
        f'{{"chat_template": {{"prompt_mode": "{other_mode}"}}}})`.',
        "- `prompt=` / `prompt_name=` text is put in front of the input's text (an "
        "instruction, as in the pipeline's texts)" + (f"; named prompts: {named}." if named
                                                       else "."),
        "- One image per input: put `<|image_1|>` in a dict's text to place it inside the "
        "text (else it goes in front). Not expressible: several images in one input, videos, "
        "audio, and `(query, document)` pairs (they would be merged into one prompt); embed "
        "each side separately.",
        "- Inputs are not truncated (as by the Embedder; truncation could cut image tokens).",
        "- The transformers load report `lm_head.weight | UNEXPECTED` is expected: the "
        "embedding model is the base model without its LM head.",
    ]
    return lines + _family_notes(family)


def _family_notes(family: str) -> list[str]:
    spec = get_backbone(family)
    if spec.requires_remote_code:
        return ["- Not checked for this family (Phi-3.5-V, remote code: no AutoModel class, and "
                "its processor takes one prompt per call): use `Embedder.from_pretrained`."]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return [f"- `AutoProcessor` (hence sentence-transformers) loads `{processor_class(spec)}`"
                ", which needs `torchvision` for its video processor: install it."]
    return []


def _settings_line(name: str, section: dict[str, Any]) -> str:
    values = ", ".join(f"{key}={value}" for key, value in section.items())
    return f"- `{name}`: {values}"


def _epochs_trained(manifest: dict[str, Any]) -> str:
    """`` (165 epochs of 4 steps)`` from a stage manifest's steps and steps per epoch."""
    steps, per_epoch = manifest.get("steps"), manifest.get("steps_per_epoch")
    if not isinstance(steps, int) or not isinstance(per_epoch, int) or per_epoch <= 0:
        return ""
    return f" ({steps / per_epoch:.4g} epochs of {per_epoch} steps)"


def _schedule_noted(section: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings, with ``epochs`` marked unused where ``steps`` set the schedule."""
    if section.get("steps") and "epochs" in section:
        return {**section, "epochs": f"{section['epochs']} (unused: steps={section['steps']} "
                                     "set the schedule)"}
    return section


def training_lines(source: Source, stage_manifests: dict[str, dict[str, Any]]) -> list[str]:
    """The card's training section: losses per stage, then the settings that made it."""
    if source.stage is None:
        return [f"Exported from the folder `{source.uri}`; its training history is not "
                "part of this run."]
    lines = []
    for stage, manifest in stage_manifests.items():
        first, final = manifest.get("first_loss"), manifest.get("final_loss")
        loss = (f"loss {first:.4f} -> {final:.4f}" if first is not None and final is not None
                else "loss not recorded")
        lines.append(f"- {stage}: {manifest.get('steps', '?')} steps, {loss}"
                     f"{_epochs_trained(manifest)}")
    config = (source.manifest or {}).get("config", {})
    sections = [*stage_manifests, "model", "train"]
    settings = [_settings_line(name, _schedule_noted(config[name])) for name in sections
                if isinstance(config.get(name), dict)]
    if settings:
        lines += ["", "Settings (from the stage manifests):", "", *settings]
    return lines


def _headline_order(metric: str) -> tuple[int, str, int] | None:
    """Sort key of a headline metric (summary means, then R@K by direction and K), else None."""
    if metric in HEADLINE_METRICS:
        return HEADLINE_METRICS.index(metric), "", 0
    direction, sep, k = metric.partition("_R@")
    return (len(HEADLINE_METRICS), direction, int(k)) if sep and k.isdigit() else None


def _own_labels(report: dict[str, Any], source_uri: str) -> list[str]:
    """Labels of the report's models that are the exported source."""
    models = report.get("models", {})
    return [label for label in report["results"]
            if storage.absolute_uri(str(models.get(label, {}).get("path", ""))) == source_uri]


def _headline_metrics(report: dict[str, Any]) -> dict[str, list[str]]:
    """Set -> its headline metrics that at least one model has a value of, in display order
    (e.g. no meta-task means where the datasets map to no meta-task)."""
    sets: dict[str, set[str]] = {}
    for by_set in report["results"].values():
        for set_name, values in by_set.items():
            sets.setdefault(set_name, set()).update(
                metric for metric, value in values.items()
                if value is not None and _headline_order(metric))
    return {name: sorted(metrics, key=_headline_order) for name, metrics in sets.items()}


def _metric_type(set_name: str, metric: str) -> str:
    """model-index metric type: recall_at_K for R@K, else the set's (precision_at_1, ...)."""
    _, sep, k = metric.partition("_R@")
    return f"recall_at_{k}" if sep else METRIC_TYPES.get(set_name, metric)


def eval_results(report: dict[str, Any] | None, source_uri: str) -> list[Any]:
    """The exported model's headline numbers as Hugging Face ``EvalResult`` (percent)."""
    from huggingface_hub import EvalResult

    if not report or not report.get("results") or not (mine := _own_labels(report, source_uri)):
        return []
    own = report["results"][mine[0]]
    return [EvalResult(task_type=PIPELINE_TAG, task_name=set_name, dataset_type=set_name,
                       dataset_name=set_name, metric_type=_metric_type(set_name, metric),
                       metric_name=metric, metric_value=round(float(value), 4))
            for set_name, metrics in _headline_metrics(report).items() for metric in metrics
            if (value := own.get(set_name, {}).get(metric)) is not None]


def front_matter(*, family: str, meta: CardMeta, report: dict[str, Any] | None,
                 source_uri: str, run_name: str) -> str:
    """The card's YAML metadata block (``---`` ... ``---``) as the Hugging Face Hub reads it."""
    from huggingface_hub import ModelCardData

    results = eval_results(report, source_uri)
    data = ModelCardData(
        library_name="sentence-transformers", pipeline_tag=PIPELINE_TAG,
        base_model=meta.base_model or None, license=meta.license,
        tags=["sentence-transformers", PIPELINE_TAG, "multimodal-embedding", "unime", family],
        datasets=list(meta.datasets), model_name=run_name if results else None,
        eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---"


def eval_lines(report: dict[str, Any] | None, source_uri: str) -> list[str]:
    """The card's evaluation table: headline metrics per eval set, one column per model."""
    if not report or not report.get("results"):
        return ["No evaluation report (run jobs/evaluate.py before exporting to include one)."]
    labels, mine = list(report["results"]), _own_labels(report, source_uri)
    header = [f"**{lb}** (this model)" if lb in mine else lb for lb in labels]
    lines = ["Percent, headline numbers of the run's `evaluate/report.json` (every dataset "
             "and the tie rule: `report.md` beside it).", "",
             "| set | metric | " + " | ".join(header) + " |",
             "|---|---|" + "---:|" * len(labels)]
    for set_name, metrics in _headline_metrics(report).items():
        for metric in metrics:
            cells = [report["results"][lb].get(set_name, {}).get(metric) for lb in labels]
            lines.append(f"| {set_name} | {metric} | " + " | ".join(
                "-" if v is None else f"{v:.2f}" for v in cells) + " |")
    if not mine:
        lines += ["", "The exported folder itself is not among the evaluated models."]
    return lines


def model_card(*, family: str, prompt_mode: str, dtype: str, destination: str,
               source: Source, run_name: str,
               stage_manifests: dict[str, dict[str, Any]],
               report: dict[str, Any] | None, meta: CardMeta = CardMeta()) -> str:
    """README.md of the exported folder: YAML metadata, then markdown (about two pages)."""
    prompts = []
    for what, prompt in prompt_examples(family):
        prompts += [f"{what}:", "", "```text", prompt, "```", ""]
    lines = [
        front_matter(family=family, meta=meta, report=report, source_uri=source.uri,
                     run_name=run_name), "",
        f"# UniME embedding model ({family})", "",
        f"A `{family}` multimodal LLM turned into a universal embedding model with the "
        f"two-stage UniME method; run `{run_name}`, exported from `{source.uri}`, weights "
        f"in {dtype}.", "",
        "## Embeddings", "",
        "One vector per input (text, image, or both): the hidden state of the **last token "
        "of the last layer**, with **left padding** (so the last position is every row's "
        "last real token), **L2-normalised**; compare with the dot product (= cosine).", "",
        "## Prompts", "",
        f"Default prompt mode stored in this folder: `{prompt_mode}` (pass `mode=` to "
        "`encode` to change it: `one_word`, `instruction`, `raw`). In input texts the image "
        "goes where `<|image_1|>` stands (in front when absent); it becomes the family's "
        "image token. Examples of the final prompts:", "",
        *prompts,
        "## Usage", "",
        "### sentence-transformers", "",
        *sentence_transformers_lines(family, destination, prompt_mode),
        "",
        "### Plain transformers", "",
        "The same vectors without this repository: render the prompts with the chat "
        "template, left-pad, take the last position of the last hidden state, L2-normalise.",
        "",
        "```python",
        transformers_snippet(destination).rstrip(),
        "",
        "",
        "from PIL import Image",
        'image = Image.open("dog.jpg").convert("RGB")',
        'emb = embed([("A dog running on the beach.", None), ("", image),',
        '             ("What is the dog doing?", image)])  # (3, D)',
        "```", "",
        "### vLLM", "",
        *vllm_lines(family, destination, prompt_mode), "",
        "### This repository (the pipeline's own loader)", "",
        "`pip install unime-pipeline` (from a clone: `pip install .`) installs only torch, "
        "transformers, sentence-transformers and pillow; loading from `s3://` also needs the "
        "`train` extra (pyarrow).", "",
        "```python",
        "from pipeline.models import Embedder",
        "",
        f'm = Embedder.from_pretrained("{destination}")  # a local folder (or s3:// prefix)',
        'emb = m.encode(texts=["<|image_1|>", "A dog running on the beach."],',
        '               images=[open("dog.jpg", "rb").read(), None])  # (2, D) unit rows',
        "```", "",
        "## Training", "",
        *training_lines(source, stage_manifests), "",
        "## Evaluation", "",
        *eval_lines(report, source.uri), "",
    ]
    return "\n".join(lines)
