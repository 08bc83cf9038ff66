"""Rank-0 training metrics: JSONL rows, TensorBoard scalars, a PNG of the curves, a progress line.

One :class:`MetricsLogger` lives on rank 0 of a training run (the only writer: no racing
files). Every optimizer step adds one row (``step``, ``epoch``, ``loss``, ``lr``,
``grad_norm``, ``samples_per_s``, ``tokens_per_s``, ``step_s`` (wall time, data included),
``compute_s``, ``data_wait_s``, ``prepare_s``, ``elapsed_s``: ``pipeline.train.loop.
with_data_time``); every
``log_every_steps`` steps it prints a progress line, and on :meth:`flush` (the loop calls
it every ``log_every_steps`` steps, at checkpoints and at the end) it writes to the stage
folder, local or ``s3://``:

    metrics.jsonl            every row so far, one JSON object per line
    tensorboard/events.*     the same scalars for TensorBoard
    curves.png               loss, learning rate, gradient norm and throughput vs step:
                             only on ``flush(plot=True)`` (checkpoints and the end), as
                             drawing it costs ~0.3 s of the training loop

Files are produced in a local scratch folder and copied with :mod:`pipeline.storage`.
A resumed run starts from the rows of the previous attempt up to the checkpoint it
resumes from (later rows are dropped: those steps are trained again), and TensorBoard's
``purge_step`` hides the re-trained steps of the old event files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

from pipeline import storage

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Collects one row per step on rank 0 and publishes them to ``stage_dir``."""

    def __init__(self, stage_dir: str, *, name: str, total_steps: int, log_every_steps: int,
                 resume_step: int = 0, sample_unit: str = "samples") -> None:
        self.stage_dir = stage_dir
        self.name = name
        self.total_steps = total_steps
        self.log_every_steps = log_every_steps
        self.sample_unit = sample_unit
        self.scratch = tempfile.mkdtemp(prefix=f"unime-{name}-metrics-")
        self.rows = _previous_rows(stage_dir, resume_step)
        self._resume_step = resume_step
        self._started = time.perf_counter()
        self._steps_this_attempt = 0
        self._download_tensorboard(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(self.scratch, TENSORBOARD_DIR),
                                    purge_step=resume_step + 1 if resume_step else None)

    # -- per step -------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        """Record one step's row; print the progress line every ``log_every_steps``."""
        self.rows.append(row)
        self._steps_this_attempt += 1
        step = int(row["step"])
        for key, value in row.items():  # the loop's scalars and a stage's own (hn_*)
            if (key not in ("step", "epoch") and isinstance(value, int | float)
                    and math.isfinite(value)):
                self.writer.add_scalar(f"{self.name}/{key}", value, step)
        if step == 1 or step % self.log_every_steps == 0 or step == self.total_steps:
            logger.info("%s", self.progress_line(row))

    def progress_line(self, row: dict[str, Any]) -> str:
        """``stage1 step 40/93 (epoch 2) | loss 6.1169 | lr 4.2e-04 | ... | eta 0:00:47``."""
        step = int(row["step"])
        per_step = (time.perf_counter() - self._started) / max(self._steps_this_attempt, 1)
        eta = per_step * max(self.total_steps - step, 0)
        grad = row.get("grad_norm")
        grad_text = f"{grad:.3g}" if grad is not None and math.isfinite(grad) else "n/a"
        return (f"{self.name} step {step}/{self.total_steps} (epoch {row['epoch'] + 1}) | "
                f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad norm {grad_text} | "
                f"{row['samples_per_s']:.0f} {self.sample_unit}/s, "
                f"{row['tokens_per_s']:.0f} tokens/s | elapsed {_clock(row['elapsed_s'])}, "
                f"eta {_clock(eta)}")

    # -- publishing -----------------------------------------------------------------------
    def flush(self, *, plot: bool = True) -> None:
        """Write metrics.jsonl and the TensorBoard files to the stage folder, and with
        ``plot`` curves.png too."""
        self.writer.flush()
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in self.rows)
        storage.write_bytes(storage.join(self.stage_dir, METRICS_FILE), lines.encode())
        if plot:
            png = os.path.join(self.scratch, CURVES_FILE)
            plot_curves(self.rows, png, title=self.name)
            with open(png, "rb") as f:
                storage.write_bytes(storage.join(self.stage_dir, CURVES_FILE), f.read())
        tb_local = os.path.join(self.scratch, TENSORBOARD_DIR)
        for name in sorted(os.listdir(tb_local)):
            with open(os.path.join(tb_local, name), "rb") as f:
                storage.write_bytes(storage.join(self.stage_dir, TENSORBOARD_DIR, name), f.read())

    def close(self) -> None:
        self.flush()
        self.writer.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _download_tensorboard(self, resume_step: int) -> None:
        if not resume_step:
            return
        local = os.path.join(self.scratch, TENSORBOARD_DIR)
        os.makedirs(local, exist_ok=True)
        for uri in storage.list_files(storage.join(self.stage_dir, TENSORBOARD_DIR)):
            with open(os.path.join(local, uri.rstrip("/").rsplit("/", 1)[-1]), "wb") as f:
                f.write(storage.read_bytes(uri))


def _previous_rows(stage_dir: str, resume_step: int) -> list[dict[str, Any]]:
    """Rows of earlier attempts up to ``resume_step`` (none when starting fresh)."""
    uri = storage.join(stage_dir, METRICS_FILE)
    if not resume_step or not storage.exists(uri):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line]
    kept = [row for row in rows if row["step"] <= resume_step]
    if len(kept) < len(rows):
        logger.info("metrics: dropped %d rows after step %d (re-trained after the resume)",
                    len(rows) - len(kept), resume_step)
    return kept


def read_metrics(stage_dir: str) -> list[dict[str, Any]]:
    """The rows of ``<stage_dir>/metrics.jsonl``."""
    data = storage.read_bytes(storage.join(stage_dir, METRICS_FILE)).decode()
    return [json.loads(line) for line in data.splitlines() if line]


def plot_curves(rows: list[dict[str, Any]], path: str, *, title: str) -> None:
    """A PNG of loss, learning rate, gradient norm and samples/s against the step; with
    stage 2's hard-negative statistics also the positive / hard-negative cosines and the
    share of queries that had a false negative dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[tuple[str, ...], str]] = [
        (("loss",), "loss"), (("lr",), "learning rate"), (("grad_norm",), "gradient norm"),
        (("samples_per_s",), "samples / s")]
    if rows and "hn_mean_pos_sim" in rows[-1]:
        panels += [(("hn_mean_pos_sim", "hn_mean_neg_sim"), "cosine: positive, hard negatives"),
                   (("hn_false_negative_rate",), "queries with a false negative")]
    steps = [row["step"] for row in rows]
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(10, 3.5 * (len(panels) // 2)))
    for ax, (keys, label) in zip(axes.flat, panels, strict=True):
        for key in keys:
            points = [(s, row[key]) for s, row in zip(steps, rows, strict=True)
                      if row.get(key) is not None and math.isfinite(row[key])]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None,
                        label=key.removeprefix("hn_"))
        if len(keys) > 1:
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: {len(rows)} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
