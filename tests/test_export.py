"""The export step on a fake finished run (tiny LLaVA-NeXT as the stage-2 model): the exported
folder loads and reproduces the trained vectors, the card names family and prompts, bf16
exports are bf16 on disk, a wrong trained vector or a missing stage fails clearly, reruns
skip, and an S3 run exports to S3."""
from __future__ import annotations

import base64
import io
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from pipeline import download_cache, outputs, storage
from pipeline.config import Config, ConfigError, load_config
from pipeline.data.schemas import IMAGE_PLACEHOLDER
from pipeline.models import META_FILE, Embedder, build_tiny_model
from pipeline.steps.export import run as export
from pipeline.steps.export import summarize as format_summary
from pipeline.train.checkpoint import EXPORT_CHECK_FILE, ExportMismatchError

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
CHECK_TEXTS = ["a red circle above a blue square", "two small green triangles",
               f"{IMAGE_PLACEHOLDER} Represent the given image with the following question: "
               "what color is the circle?"]
STAGE2_LOSSES = (3.0, 1.25)
STAGE1_LOSSES = (40.5, 12.0)
MMEB_MEAN = 42.5


def png_bytes(color: str = "red") -> bytes:
    image = Image.new("RGB", (48, 48), "white")
    ImageDraw.Draw(image).ellipse([4, 4, 42, 42], fill=color)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """``stage2/model`` + ``export_check.json`` of a tiny model (files only, no manifests)."""
    root = tmp_path_factory.mktemp("export") / "base"
    tiny = build_tiny_model("llava_next", root.parent / "tiny", seed=0,
                            vocab_texts=[*CHECK_TEXTS, "what color is the circle"])
    embedder = Embedder.from_pretrained(tiny, device="cpu")
    embedder.save_pretrained(root / "stage2" / "model")
    images = [None, None, png_bytes()]
    trained = embedder.encode(CHECK_TEXTS, images, mode="instruction")  # (3, D)
    check = {"texts": CHECK_TEXTS, "trained_emb": trained.tolist(), "min_cosine": 1.0,
             "threshold": 0.9999, "mode": "instruction",
             "images": [None if i is None else base64.b64encode(i).decode() for i in images]}
    (root / "stage2" / EXPORT_CHECK_FILE).write_text(json.dumps(check))
    return root


def make_run(base: pathlib.Path, root: str, *overrides: str) -> Config:
    """A finished fake run at ``root`` (local or s3://): stage manifests, eval report."""
    config = load_config(None, [f"output_root={root}", *overrides])
    for path in sorted(base.rglob("*")):
        if path.is_file():
            rel = path.relative_to(base).as_posix()
            storage.write_bytes(storage.join(root, *rel.split("/")), path.read_bytes())
    model = storage.join(config.step_dir("stage2"), "model")
    for stage, (first, final) in (("stage1", STAGE1_LOSSES), ("stage2", STAGE2_LOSSES)):
        outputs.write_manifest(config.step_dir(stage), {
            "rows_in": 10, "rows_out": 10, "rows_rejected": 0,
            "config_hash": config.config_hash, "seconds": 1.0, "steps": 7,
            "first_loss": first, "final_loss": final, "config": config.to_dict()})
    report = {"tie_rule": "a tie counts against the ground truth",
              "models": {"base": {"path": "/elsewhere/base"},
                         "stage2": {"path": model if storage.is_s3(root)
                                    else str(pathlib.Path(model).resolve())}},
              "results": {"base": {"mmeb": {"overall_mean_of_datasets": 10.0, "dsA": 5.0}},
                          "stage2": {"mmeb": {"overall_mean_of_datasets": MMEB_MEAN,
                                              "dsA": 50.0}}}}
    storage.write_json(storage.join(root, "evaluate", "report.json"), report)
    return config


def check_rows(base: pathlib.Path) -> tuple[list[str], list[bytes | None], torch.Tensor]:
    check = json.loads((base / "stage2" / EXPORT_CHECK_FILE).read_text())
    images = [None if i is None else base64.b64decode(i) for i in check["images"]]
    return check["texts"], images, torch.tensor(check["trained_emb"])


def weight_dtypes(folder: pathlib.Path) -> set[str]:
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    return dtypes


# ---------------------------------------------------------------------------------------


def test_float32_export_round_trip_card_and_manifest(base_run, tmp_path, monkeypatch):
    config = make_run(base_run, str(tmp_path / "run"))
    writes: list[str] = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes",
                        lambda uri, data: (writes.append(uri), real_write(uri, data))[1])
    manifest = export(config)

    dest = tmp_path / "run" / "export" / "model"
    assert manifest["destination"] == str(dest)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (1, 1, 0)
    assert manifest["config_hash"] == config.config_hash
    assert manifest["family"] == "llava_next" and manifest["dtype"] == "float32"
    assert manifest["check"]["kind"] == "export_check" and manifest["check"]["rows"] == 3
    assert manifest["check"]["threshold"] == 0.9999 and manifest["min_cosine"] >= 0.9999
    loaders = manifest["loaders"]  # the same folder through the three loaders of the card
    assert set(loaders["min_cosine"]) == {"embedder", "sentence_transformers", "transformers"}
    assert min(loaders["min_cosine"].values()) >= 0.9999 and not loaders["skipped"]
    assert set(loaders["rows"]) == {"text", "image", "image+text"}
    written = outputs.read_manifest(str(tmp_path / "run" / "export"))
    assert written["min_cosine"] == manifest["min_cosine"] and written["destination"] == str(dest)
    # The marker file is the last one written into the destination.
    dest_writes = [w for w in writes if w.startswith(str(dest))]
    assert dest_writes[-1] == str(dest / META_FILE) and len(dest_writes) > 3

    texts, images, trained = check_rows(base_run)
    exported = Embedder.from_pretrained(dest, device="cpu")
    emb = exported.encode(texts, images, mode="instruction")
    assert torch.nn.functional.cosine_similarity(emb, trained).min() >= 0.9999
    assert weight_dtypes(dest) == {"F32"}

    card = (dest / "README.md").read_text()
    for expected in ("llava_next", "Summary above sentence in one word:",
                     "Summary above image in one word:", "[INST] <image>\n",
                     "Default prompt mode stored in this folder: `one_word`",
                     "Embedder.from_pretrained", "last token", "left padding",
                     "stage1: 7 steps, loss 40.5000 -> 12.0000",
                     "stage2: 7 steps, loss 3.0000 -> 1.2500", "**stage2** (this model)",
                     f"{MMEB_MEAN:.2f}", "`stage2`: batching=mixed, epochs=1", "init=stage1"):
        assert expected in card, expected
    assert "dsA" not in card  # headline metrics only
    summary = format_summary(manifest, config.step_dir("export"))
    assert "llava_next" in summary and "min cosine" in summary


def test_rerun_skips_and_redoes_when_an_input_changes(base_run, tmp_path, monkeypatch):
    config = make_run(base_run, str(tmp_path / "run"))
    first = export(config)
    writes: list[str] = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes",
                        lambda uri, data: (writes.append(uri), real_write(uri, data))[1])
    assert export(config)["seconds"] == first["seconds"]  # unchanged: skipped
    assert writes == []
    report_uri = str(tmp_path / "run" / "evaluate" / "report.json")
    report = storage.read_json(report_uri)
    report["results"]["stage2"]["mmeb"]["overall_mean_of_datasets"] = 77.25
    storage.write_json(report_uri, report)
    again = export(config)
    assert again["inputs"] != first["inputs"] and writes
    assert "77.25" in (tmp_path / "run" / "export" / "model" / "README.md").read_text()


def test_bf16_export_passes_looser_threshold_and_is_bf16_on_disk(base_run, tmp_path):
    config = make_run(base_run, str(tmp_path / "run"), "export.dtype=bfloat16",
                      f"export.destination={tmp_path / 'bf16'}")
    manifest = export(config)
    assert manifest["dtype"] == "bfloat16" and manifest["stored_dtype"] == "float32"
    assert manifest["check"]["threshold"] == 0.99 and manifest["min_cosine"] >= 0.99
    assert weight_dtypes(tmp_path / "bf16") == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tampered_trained_vectors_fail_the_round_trip(base_run, tmp_path):
    config = make_run(base_run, str(tmp_path / "run"))
    check_uri = str(tmp_path / "run" / "stage2" / EXPORT_CHECK_FILE)
    check = storage.read_json(check_uri)
    check["trained_emb"][1] = [-v for v in check["trained_emb"][1]]
    storage.write_json(check_uri, check)
    with pytest.raises(ExportMismatchError, match=r"rows \[1\]"):
        export(config)
    assert outputs.read_manifest(config.step_dir("export")) is None


def test_missing_stage_names_export_source_and_the_step_to_run(base_run, tmp_path):
    config = make_run(base_run, str(tmp_path / "run"), "export.source=stage1")
    shutil.rmtree(tmp_path / "run" / "stage1")
    with pytest.raises(FileNotFoundError, match="export.source=stage1") as err:
        export(config)
    assert str(tmp_path / "run" / "stage1") in str(err.value)
    assert "jobs/stage1.py" in str(err.value)
    missing = load_config(None, [f"output_root={tmp_path / 'run'}",
                                 f"export.source={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="export.source="):
        export(missing)


def test_plain_folder_source_is_checked_against_itself(base_run, tmp_path):
    source = tmp_path / "plain"
    shutil.copytree(base_run / "stage2" / "model", source)  # no export_check.json beside it
    config = load_config(None, [f"output_root={tmp_path / 'run'}", f"export.source={source}"])
    manifest = export(config)
    assert manifest["check"]["kind"] == "probe_rows" and manifest["check"]["rows"] >= 4
    assert manifest["min_cosine"] >= 0.9999 and manifest["source_stage"] is None
    card = (tmp_path / "run" / "export" / "model" / "README.md").read_text()
    assert "training history is not part of this run" in card


@pytest.mark.parametrize("destination", ["run/stage2", "run", "run/stage1/model", "run/export"])
def test_destination_over_the_source_or_the_run_is_refused(base_run, tmp_path, destination):
    config = make_run(base_run, str(tmp_path / "run"),
                      f"export.destination={tmp_path / destination}")
    with pytest.raises(ConfigError, match="export.destination"):
        export(config)
    assert (tmp_path / "run" / "stage2" / "model" / META_FILE).exists()
    assert (tmp_path / "run" / "stage1" / outputs.MANIFEST_NAME).exists()


@pytest.mark.cluster
def test_s3_run_exports_to_s3(base_run, s3_bucket, tmp_path):
    root = f"{s3_bucket}/runs/demo"
    config = make_run(base_run, root)
    manifest = export(config)
    dest = f"{root}/export/model"
    assert manifest["destination"] == dest and manifest["min_cosine"] >= 0.9999
    assert outputs.read_manifest(f"{root}/export")["family"] == "llava_next"
    assert "**stage2** (this model)" in storage.read_bytes(f"{dest}/README.md").decode()
    local = download_cache.download_to_cache(dest, cache_dir=str(tmp_path / "cache"))
    texts, images, trained = check_rows(base_run)
    emb = Embedder.from_pretrained(local, device="cpu").encode(texts, images, mode="instruction")
    assert torch.nn.functional.cosine_similarity(emb, trained).min() >= 0.9999


def test_cli_exports_and_reports_a_missing_stage(base_run, tmp_path):
    make_run(base_run, str(tmp_path / "run"))
    args = [sys.executable, "jobs/export.py", "--config", DEMO, f"output_root={tmp_path / 'run'}"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\nexport -> " in "\n" + done.stdout and "min cosine" in done.stdout
    shutil.rmtree(tmp_path / "run" / "stage1")
    failed = subprocess.run([*args, "export.source=stage1"], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert failed.returncode == 1
    assert "export.source=stage1" in failed.stderr
