"""The model card (README.md) of an exported folder: what the embedding is, the family's
prompts, usage, the training that made it and the evaluation numbers of the run."""
from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.data.schemas import IMAGE_PLACEHOLDER
from pipeline.models.export import Source
from pipeline.models.registry import format_text, get_backbone

HEADLINE_METRICS = ("overall_mean_of_metatasks", "overall_mean_of_datasets",
                    "in_distribution_mean", "out_of_distribution_mean", "mean")


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


def _settings_line(name: str, section: dict[str, Any]) -> str:
    values = ", ".join(f"{key}={value}" for key, value in section.items())
    return f"- `{name}`: {values}"


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
        lines.append(f"- {stage}: {manifest.get('steps', '?')} steps, {loss}")
    config = (source.manifest or {}).get("config", {})
    sections = [*stage_manifests, "model", "train"]
    settings = [_settings_line(name, config[name]) for name in sections
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


def eval_lines(report: dict[str, Any] | None, source_uri: str) -> list[str]:
    """The card's evaluation table: headline metrics per eval set, one column per model."""
    if not report or not report.get("results"):
        return ["No evaluation report (run jobs/evaluate.py before exporting to include one)."]
    labels = list(report["results"])
    mine = [lb for lb in labels
            if storage.absolute_uri(str(report.get("models", {}).get(lb, {}).get("path", ""))) == source_uri]
    header = [f"**{lb}** (this model)" if lb in mine else lb for lb in labels]
    lines = ["Percent, headline numbers of the run's `evaluate/report.json` (every dataset "
             "and the tie rule: `report.md` beside it).", "",
             "| set | metric | " + " | ".join(header) + " |",
             "|---|---|" + "---:|" * len(labels)]
    sets: dict[str, set[str]] = {}
    for label in labels:
        for set_name, values in report["results"][label].items():
            sets.setdefault(set_name, set()).update(m for m in values if _headline_order(m))
    for set_name, names in sets.items():
        for metric in sorted(names, key=_headline_order):
            cells = [report["results"][lb].get(set_name, {}).get(metric) for lb in labels]
            lines.append(f"| {set_name} | {metric} | " + " | ".join(
                "-" if v is None else f"{v:.2f}" for v in cells) + " |")
    if not mine:
        lines += ["", "The exported folder itself is not among the evaluated models."]
    return lines


def model_card(*, family: str, prompt_mode: str, dtype: str, destination: str,
               source: Source, run_name: str,
               stage_manifests: dict[str, dict[str, Any]],
               report: dict[str, Any] | None) -> str:
    """README.md of the exported folder (markdown, about a page)."""
    prompts = []
    for what, prompt in prompt_examples(family):
        prompts += [f"{what}:", "", "```text", prompt, "```", ""]
    lines = [
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
        "```python",
        "from pipeline.models import Embedder",
        "",
        f'm = Embedder.from_pretrained("{destination}")  # local folder or s3:// prefix',
        'emb = m.encode(texts=["<|image_1|>", "A dog running on the beach."],',
        '               images=[open("dog.jpg", "rb").read(), None])  # (2, D) unit rows',
        "```", "",
        "## Training", "",
        *training_lines(source, stage_manifests), "",
        "## Evaluation", "",
        *eval_lines(report, source.uri), "",
    ]
    return "\n".join(lines)
