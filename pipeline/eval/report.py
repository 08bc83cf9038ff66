"""The evaluation report: ``report.json``, ``report.md`` and one bar plot per eval set.

``report.json``::

    {"unit": "percent", "tie_rule": "...", "models": {label: {"path": ...}},
     "prompt_modes": {"mmeb": ..., "captions": ...},
     "sets": {set: {"metric": ..., "rows": n, "scored": n, "per_group": {...}}},
     "results": {label: {set: {metric name: value}}},
     "mmeb": {"metatasks_missing": [...], "unmapped": [...]}}

Sets: ``mmeb`` (metrics: one P@1 per dataset, ``metatask:<name>``,
``overall_mean_of_datasets``, ``overall_mean_of_metatasks`` and, when MMEB datasets with
that label are present, ``in_distribution_mean`` / ``out_of_distribution_mean``),
``retrieval`` (``t2i_R@K``, ``i2t_R@K``) and ``sugarcrepe`` (one accuracy per category and
``mean``). A value that cannot be computed is ``null``.
"""
from __future__ import annotations

import io
import math
from typing import Any

from pipeline import outputs, storage
from pipeline.config import Config
from pipeline.eval import metrics
from pipeline.eval.embed import ModelRef
from pipeline.eval.scoring import TIE_RULE
from pipeline.eval.sets import EvalSet

# step -> its plot, copied next to the report as training_<step>.png
TRAINING_PLOTS = {"stage1": "curves.png", "mine_negatives": "scores.png", "stage2": "curves.png"}
SET_TITLES = {
    "mmeb": "MMEB-format sets: Precision@1 (%), ground truth = candidate 0",
    "retrieval": "Caption retrieval: Recall@K (%), t2i = text->image, i2t = image->text",
    "sugarcrepe": "Compositionality (SugarCrepe): accuracy (%), positive vs negative caption",
}


def clean(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def metric_names(report: dict[str, Any], set_name: str) -> list[str]:
    """Metric names of a set in first-seen order over the models."""
    names: dict[str, None] = {}
    for per_set in report["results"].values():
        for name in per_set.get(set_name, {}):
            names.setdefault(name, None)
    return list(names)


def markdown(report: dict[str, Any]) -> str:
    labels = list(report["models"])
    lines = [f"# Evaluation report: run {report['run_name']}", "",
             "| model | path |", "|---|---|"]
    lines += [f"| {label} | `{m['path']}` |" for label, m in report["models"].items()]
    lines += ["", f"Values in percent. Tie rule: {report['tie_rule']}", "",
              f"Prompt modes: MMEB-format sets `{report['prompt_modes']['mmeb']}`, caption "
              f"sets `{report['prompt_modes']['captions']}`.", ""]
    for set_name, info in report["sets"].items():
        lines += [f"## {SET_TITLES.get(set_name, set_name)}", "",
                  f"{info['scored']} of {info['rows']} rows scored.", "",
                  f"![{set_name}]({set_name}.png)", "",
                  "| metric | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for name in metric_names(report, set_name):
            values = [_fmt(report["results"][label][set_name].get(name)) for label in labels]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
        lines.append("")
    lines += training_markdown(report.get("training", {}))
    mmeb = report.get("mmeb")
    if mmeb:
        if mmeb["metatasks_missing"]:
            lines.append("Meta-tasks without any dataset (left out of "
                         f"overall_mean_of_metatasks): {', '.join(mmeb['metatasks_missing'])}.")
        if mmeb["unmapped"]:
            lines.append("Datasets without a meta-task (only in overall_mean_of_datasets): "
                         f"{', '.join(mmeb['unmapped'])}.")
        lines.append("")
    return "\n".join(lines)


def bar_plot_png(report: dict[str, Any], set_name: str) -> bytes:
    """Grouped bars: one group per metric (dataset, category, R@K), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = metric_names(report, set_name)
    labels = list(report["models"])
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * max(1, len(labels)) + 2), 4))
    for i, label in enumerate(labels):
        values = [report["results"][label][set_name].get(n) for n in names]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width,
               [np.nan if v is None else v for v in values], width=width, label=label)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(SET_TITLES.get(set_name, set_name), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def training_summary(run_root: str) -> dict[str, Any]:
    """What the run's finished training and mining steps report (losses, steps, seconds,
    hard-negative statistics), and where their plots are; {} for steps not run."""
    out: dict[str, Any] = {}
    for step, plot in TRAINING_PLOTS.items():
        folder = storage.join(run_root, step)
        manifest = outputs.read_manifest(folder)
        if manifest is None:
            continue
        keys = ("steps", "first_loss", "final_loss", "seconds", "totals", "hard_negatives")
        out[step] = {key: manifest[key] for key in keys if key in manifest}
        if storage.exists(storage.join(folder, plot)):
            out[step]["plot"] = storage.join(folder, plot)
    return out


def training_markdown(training: dict[str, Any]) -> list[str]:
    if not training:
        return []
    lines = ["## Training and mining", ""]
    for step, info in training.items():
        if "first_loss" in info:
            lines.append(f"- **{step}**: {info['steps']} steps, loss {info['first_loss']:.4f} "
                         f"-> {info['final_loss']:.4f} ({info['seconds']:.0f} s)")
        elif "totals" in info:
            totals = info["totals"]
            lines.append(f"- **{step}**: {totals.get('queries', 0)} queries, "
                         f"{totals.get('n_selected', 0)} negatives kept, "
                         f"{totals.get('dropped_margin', 0)} false negatives dropped")
        hard = info.get("hard_negatives", {})
        if "hn_false_negative_rate" in hard:
            lines.append(f"  (queries with a false negative dropped per step: "
                         f"{100 * hard['hn_false_negative_rate']['mean']:.1f}% on average)")
    lines.append("")
    lines += [f"![{step}](training_{step}.png)" for step, info in training.items()
              if "plot" in info]
    return [*lines, ""]


def write_report(report: dict[str, Any], folder: str) -> list[str]:
    """report.json, report.md, ``<set>.png`` per eval set and the training / mining plots
    (``training_<step>.png``); returns the file names."""
    storage.write_json(storage.join(folder, "report.json"), report)
    storage.write_bytes(storage.join(folder, "report.md"), markdown(report).encode())
    names = ["report.json", "report.md"]
    for set_name in report["sets"]:
        storage.write_bytes(storage.join(folder, f"{set_name}.png"),
                            bar_plot_png(report, set_name))
        names.append(f"{set_name}.png")
    for step, info in report.get("training", {}).items():
        if "plot" in info:
            storage.write_bytes(storage.join(folder, f"training_{step}.png"),
                                storage.read_bytes(info["plot"]))
            names.append(f"training_{step}.png")
    return names


def build_report(config: Config, refs: dict[str, ModelRef], sets: list[EvalSet],
                 set_info: dict[str, Any], results: dict[str, Any],
                 extra_metatasks: dict[str, str]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "run_name": config.run_name, "unit": "percent", "tie_rule": TIE_RULE,
        "models": {label: {"path": ref.path} for label, ref in refs.items()},
        "prompt_modes": {"mmeb": config.eval.prompt_mode,
                         "captions": config.eval.caption_prompt_mode},
        "sets": set_info, "results": clean(results),
        "training": clean(training_summary(config.run_root)),
    }
    mmeb = next((s for s in sets if s.name == "mmeb"), None)
    if mmeb is not None:
        datasets = sorted({r.group for r in mmeb.rows})
        summary = metrics.mmeb_summary(dict.fromkeys(datasets, 0.0), extra_metatasks)
        report["mmeb"] = {"metatasks_missing": summary["metatasks_missing"],
                          "unmapped": summary["unmapped"],
                          "metatask_of": {d: metrics.metatask_map(extra_metatasks).get(d)
                                          for d in datasets}}
    return report
