"""The prepare step through Ray Data: demo world, rejects, rerun, S3, CLI."""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import outputs, storage
from pipeline.config import load_config
from pipeline.data import schemas
from pipeline.data.prepare import SourcesChangedError
from pipeline.data.readers import SourceError
from pipeline.outputs import OutputConflictError
from pipeline.steps.prepare_data import run as prepare_data
from pipeline.steps.prepare_data import summarize as format_summary

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
SMALL = ["data.demo.num_train_images=24", "data.demo.num_eval_images=8",
         "data.demo.num_nli_groups=30", "data.demo.num_eval_candidates=4",
         "data.demo.image_size_px=32", "data.image_size=16", "data.rows_per_shard=10"]

pytestmark = pytest.mark.integration


def small_config(root, *extra):
    return load_config(DEMO, [*SMALL, f"output_root={root}", *extra])


def table_rows(folder: str) -> list[dict]:
    rows = []
    for uri in outputs.shard_uris(folder):
        rows += storage.read_table(uri).to_pylist()
    return rows


def test_demo_world_prepares_every_table(ray_local, tmp_path):
    config = small_config(tmp_path / "run")
    manifest = prepare_data(config)
    step = config.step_dir("prepare_data")
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["rows_rejected"] == 0  # the demo world is clean
    tables = manifest["tables"]
    assert set(tables) == {"text_groups", "pairs", "eval_images", "eval"}
    assert tables["text_groups"]["rows_out"] == 30
    for name, schema in schemas.TABLES.items():
        folder = f"{step}/{name}"
        sub = outputs.require_complete(folder)
        assert sub["rows_out"] == len(table_rows(folder)) > 0
        for uri in outputs.shard_uris(folder):
            assert pq.read_schema(uri).equals(schema, check_metadata=False), name
    # Shards are deterministic and sized by data.rows_per_shard.
    groups = f"{step}/text_groups"
    assert [os.path.basename(u) for u in outputs.shard_uris(groups)] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    pairs = table_rows(f"{step}/pairs")
    assert {p["dataset"] for p in pairs} >= {"demo_t2i", "demo_i2t", "demo_cls", "demo_vqa"}
    image = Image.open(io.BytesIO(next(p["pos_image"] for p in pairs if p["pos_image"])))
    assert image.size == (16, 16) and image.mode == "RGB"
    # Every eval image key resolves to a packed image.
    keys = {r["key"] for r in table_rows(f"{step}/eval_images")}
    for row in table_rows(f"{step}/eval"):
        assert {k for k in [row["qry_image_key"], *row["tgt_image_key"]] if k} <= keys
    summary = format_summary(manifest, step)
    assert "text_groups" in summary and f"{manifest['rows_in']:>8}" in summary


def test_corrupt_image_and_empty_text_become_two_rejects(ray_local, tmp_path):
    src = tmp_path / "src"
    (src / "mmeb").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(src / "ok.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ph = schemas.IMAGE_PLACEHOLDER
    rows = [{"qry": f"query {i}", "qry_image_path": "", "pos_text": f"{ph}\nRepresent it.",
             "pos_image_path": "ok.png"} for i in range(5)]
    rows[1]["pos_image_path"] = "broken.png"
    rows[3]["qry"] = ""
    (src / "mmeb" / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(DEMO, [f"output_root={tmp_path / 'run'}", "data.use_demo_world=false",
                                f"data.sources.mmeb_train={src / 'mmeb'}",
                                f"data.sources.mmeb_train_images={src}",
                                "data.image_size=8", "data.rows_per_shard=2"])
    manifest = prepare_data(config)
    pairs = manifest["tables"]["pairs"]
    assert (pairs["rows_in"], pairs["rows_out"], pairs["rows_rejected"]) == (5, 3, 2)
    assert pairs["rejects_by_reason"] == {"corrupt_image": 1, "empty_text": 1}
    rejects = table_rows(f"{config.step_dir('prepare_data')}/pairs/_rejects")
    by_id = {r["id"]: r for r in rejects}
    assert by_id["task:1"]["reason"] == "corrupt_image" and "broken.png" in \
        by_id["task:1"]["detail"]
    assert by_id["task:3"]["field"] == "qry_text" and by_id["task:3"]["source"].endswith(
        "task.jsonl:4")
    assert json.loads(by_id["task:3"]["row_json"]) == rows[3]


@pytest.mark.reliability
def test_rerun_skips_completed_shards(ray_local, tmp_path):
    config = small_config(tmp_path / "run")
    first = prepare_data(config)
    step = config.step_dir("prepare_data")
    pairs = f"{step}/pairs"
    shards = outputs.shard_uris(pairs)
    assert len(shards) >= 3
    mtimes = {u: os.stat(u).st_mtime_ns for u in shards}
    # Simulate a job killed after some shards: drop one shard and the manifests.
    os.remove(shards[1])
    os.remove(f"{pairs}/_manifest.json")
    os.remove(f"{step}/_manifest.json")
    second = prepare_data(config)
    assert second["tables"] == first["tables"]
    assert outputs.read_manifest(pairs)["shards_skipped"] == len(shards) - 1
    for uri in shards:
        if uri != shards[1]:
            assert os.stat(uri).st_mtime_ns == mtimes[uri], f"{uri} was rewritten"
    assert os.path.exists(shards[1])
    # A complete step is not redone at all.
    assert prepare_data(config)["seconds"] == second["seconds"]


@pytest.mark.reliability
def test_other_config_cannot_write_into_the_same_folder(ray_local, tmp_path):
    prepare_data(small_config(tmp_path / "run"))
    os.remove(tmp_path / "run" / "prepare_data" / "_manifest.json")
    os.remove(tmp_path / "run" / "prepare_data" / "pairs" / "_manifest.json")
    with pytest.raises(OutputConflictError, match="holds outputs of another config"):
        prepare_data(small_config(tmp_path / "run", "data.image_size=24"))


@pytest.mark.cluster
def test_prepare_to_s3(ray_local, s3_bucket):
    root = f"{s3_bucket}/runs/demo"
    config = small_config(root)
    manifest = prepare_data(config)
    step = config.step_dir("prepare_data")
    assert step.startswith("s3://")
    assert outputs.require_complete(step)["rows_out"] == manifest["rows_out"] > 0
    # The demo world went to S3 too, and the images were read back from there.
    assert storage.exists(f"{root}/sources/demo_world/world.json")
    assert manifest["sources"]["mmeb_train"].startswith("s3://")
    assert len(table_rows(f"{step}/pairs")) == manifest["tables"]["pairs"]["rows_out"]


@pytest.mark.cluster
@pytest.mark.reliability
def test_credentials_are_in_no_output_file_and_no_ray_log(ray_local, s3_bucket, tmp_path):
    """Prepare to S3 and to a local folder with fake credentials in the environment, then
    read every object, output file and Ray log of the session: neither key appears."""
    import boto3
    import ray

    from tests.conftest import S3_TEST_ENV

    secrets = [S3_TEST_ENV["AWS_ACCESS_KEY_ID"].encode(),
               S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"].encode()]
    prepare_data(small_config(f"{s3_bucket}/runs/demo"))
    prepare_data(small_config(tmp_path / "run"))
    client = boto3.client("s3", region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    blobs = {f"{s3_bucket}/{k}": client.get_object(Bucket=bucket, Key=k)["Body"].read()
             for k in keys}
    session = pathlib.Path(ray._private.worker._global_node.get_session_dir_path())
    for folder in (tmp_path, session / "logs"):
        blobs.update({str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    assert len(keys) > 20 and len(blobs) > 60
    leaked = [name for name, data in blobs.items() if any(s in data for s in secrets)]
    assert leaked == []


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "jobs/prepare_data.py", "--config", DEMO,
                          "data.image_size=huge", f"output_root={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "config error: data.image_size: expected an integer, got 'huge'" in out.stderr
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# Reliability: the fault matrix cases of the prepare step (README: Reliability)


def run_bounded(fn, *args, timeout_s: float = 300.0):
    """``fn(*args)`` in a thread; a hang fails the test instead of the suite."""
    import threading

    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{fn.__name__} did not finish within {timeout_s} s (hang)"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.reliability
def test_missing_and_corrupt_eval_images_are_rejects_not_a_hang(ray_local, tmp_path):
    """The rejects of eval_images travel to the eval shards' tasks as RowErrors (they must
    unpickle there, or Ray Data retries the task for ever)."""
    from pipeline.data.prepare import resolve_sources

    config = small_config(tmp_path / "run", "data.max_reject_fraction=1.0")
    world = pathlib.Path(resolve_sources(config).mmeb_eval_images)
    images = sorted((world / "images" / "eval").glob("*.png"))
    eval_rows = [json.loads(line) for f in sorted((world / "mmeb_eval").glob("*.jsonl"))
                 for line in f.read_text().splitlines()]
    used = [p for p in images if any(str(p.relative_to(world)) in json.dumps(r)
                                     for r in eval_rows)]
    missing, corrupt = used[0], used[1]
    missing.unlink()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    manifest = run_bounded(prepare_data, config)
    images_table = manifest["tables"]["eval_images"]
    assert images_table["rejects_by_reason"] == {"missing_image": 1, "corrupt_image": 1}
    eval_table = manifest["tables"]["eval"]
    assert eval_table["rows_rejected"] >= 1
    assert set(eval_table["rejects_by_reason"]) <= {"missing_image", "corrupt_image"}
    for table in manifest["tables"].values():
        assert table["rows_in"] == table["rows_out"] + table["rows_rejected"]


def nli_config(tmp_path, text: str, *extra: str):
    source = tmp_path / "nli.csv"
    source.write_text(text)
    return load_config(DEMO, [f"output_root={tmp_path / 'run'}", "data.use_demo_world=false",
                              f"data.sources.nli_csv={source}", *extra]), source


@pytest.mark.reliability
def test_a_table_of_rejects_fails_the_step_naming_reasons_and_a_row(ray_local, tmp_path):
    rows = "".join(f"a{i},b{i},\n" for i in range(6)) + "a,b,c\n"  # 6 of 7 lack hard_neg
    config, _ = nli_config(tmp_path, "sent0,sent1,hard_neg\n" + rows)
    with pytest.raises(SourceError, match=r"text_groups: 6 of 7 rows rejected \(86%; "
                                          r"data.max_reject_fraction=0.5\), top reasons "
                                          r"empty_text \(6\); e.g. row 'nli:0' \(.*nli.csv:2\) "
                                          r"texts\[2\]: empty_text"):
        prepare_data(config)
    folder = config.step_dir("prepare_data")
    assert not outputs.is_complete(f"{folder}/text_groups") and not outputs.is_complete(folder)
    # Raising the threshold accepts the same table (the rejects stay counted).
    config, _ = nli_config(tmp_path, "sent0,sent1,hard_neg\n" + rows,
                           "data.max_reject_fraction=0.9", f"output_root={tmp_path / 'run2'}")
    table = prepare_data(config)["tables"]["text_groups"]
    assert (table["rows_in"], table["rows_out"], table["rows_rejected"]) == (7, 1, 6)


@pytest.mark.reliability
def test_an_empty_source_is_refused(ray_local, tmp_path):
    config, _ = nli_config(tmp_path, "sent0,sent1,hard_neg\n")
    with pytest.raises(SourceError, match="text_groups: its sources hold no rows"):
        prepare_data(config)


@pytest.mark.reliability
def test_a_changed_source_file_is_refused_on_rerun(ray_local, tmp_path):
    rows = "sent0,sent1,hard_neg\n" + "".join(f"a{i},b{i},c{i}\n" for i in range(14))
    config, source = nli_config(tmp_path, rows)
    first = prepare_data(config)
    assert prepare_data(config)["seconds"] == first["seconds"]  # unchanged: reused
    source.write_text(rows.replace("a3,b3,c3", "a3,b3,changed"))
    with pytest.raises(SourcesChangedError, match=r"prepare_data was prepared from other "
                       r"source files \(data.sources.nli_csv: sha256 [0-9a-f]{12} \(1 file"
                       r"\(s\), \d+ bytes\) -> sha256 [0-9a-f]{12} .*delete .*run"):
        prepare_data(config)
    # The table's own check, for a step folder whose manifest is gone (a killed rerun).
    os.remove(f"{config.step_dir('prepare_data')}/_manifest.json")
    with pytest.raises(SourcesChangedError, match="table .*text_groups was prepared from "
                                                  "other source files"):
        prepare_data(config)


@pytest.mark.reliability
def test_a_text_only_eval_set_has_an_empty_eval_images_table(ray_local, tmp_path):
    """eval_images is derived from the eval rows: none of them has an image, so it is empty,
    and that is not the empty-source error."""
    src = tmp_path / "eval"
    src.mkdir()
    (src / "texts.jsonl").write_text("".join(json.dumps(
        {"qry_text": f"query {i}", "qry_img_path": "", "tgt_text": [f"a{i}", f"b{i}"],
         "tgt_img_path": ["", ""]}) + "\n" for i in range(4)))
    config = load_config(DEMO, [f"output_root={tmp_path / 'run'}", "data.use_demo_world=false",
                                f"data.sources.mmeb_eval={src}"])
    tables = prepare_data(config)["tables"]
    assert tables["eval_images"]["rows_in"] == 0
    assert (tables["eval"]["rows_in"], tables["eval"]["rows_out"]) == (4, 4)
