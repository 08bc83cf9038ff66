"""The mining step through Ray: against a float64 brute force, S3 output, rejects, rerun."""
from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import outputs, storage
from pipeline.config import load_config
from pipeline.data.images import PackOptions, content_key, pack_image
from pipeline.data.mined import check_pair, read_with_negatives
from pipeline.data.schemas import MINED, PAIRS
from pipeline.models import build_tiny_model
from pipeline.steps.mine_negatives import MinerEmbedTask, MinerShardWorker
from pipeline.steps.mine_negatives import run as mine_negatives
from pipeline.steps.prepare_data import run as prepare_data

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
SMALL = ["data.demo.num_train_images=30", "data.demo.num_eval_images=8",
         "data.demo.num_nli_groups=10", "data.demo.num_eval_candidates=4",
         "data.demo.image_size_px=32", "data.image_size=32", "data.rows_per_shard=50",
         "mining.num_actors=2", "mining.search_k=12", "mining.num_negatives=4",
         "mining.block_size=7", "mining.query_block_size=5"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def miner(tmp_path_factory) -> str:
    return build_tiny_model("qwen2_vl", str(tmp_path_factory.mktemp("miner")), seed=0)


def rows_of(folder: str) -> list[dict]:
    return [r for uri in outputs.shard_uris(folder) for r in storage.read_table(uri).to_pylist()]


def brute_force_negatives(embeddings: list[dict], pairs: list[dict], *,
                          margin: float, num: int) -> dict[str, list[str]]:
    """Plain float64 reference: per query, ALL its dataset's distinct targets ranked by
    cosine (an exhaustive search), minus the positive's key, minus sim > pos + margin,
    first ``num`` keys."""
    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        return v / np.linalg.norm(v)

    targets = [(e["dataset"], e["key"], unit(e["emb"])) for e in embeddings
               if e["kind"] == "target"]
    queries = {e["key"]: unit(e["emb"]) for e in embeddings if e["kind"] == "query"}
    expected = {}
    for pair in pairs:
        q = queries[pair["id"]]
        pool = [(float(q @ t), key) for d, key, t in targets if d == pair["dataset"]]
        pos = next(s for s, key in pool if key == pair["pos_key"])
        ranked = sorted(pool, key=lambda sk: -sk[0])
        kept = [key for s, key in ranked if key != pair["pos_key"] and s <= pos + margin]
        expected[pair["id"]] = kept[:num]
    return expected


@pytest.mark.cluster
def test_mining_matches_brute_force_on_s3(ray_local, s3_bucket, miner):
    config = load_config(DEMO, [*SMALL, f"output_root={s3_bucket}/run", f"mining.miner={miner}",
                                "mining.fn_margin=0.0"])
    prepare_data(config)
    manifest = mine_negatives(config)
    folder = config.step_dir("mine_negatives")
    pairs = rows_of(f"{config.run_root}/prepare_data/pairs")
    mined = rows_of(folder)
    assert manifest["rows_in"] == len(pairs) == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["rows_rejected"] == 0 and len(mined) == len(pairs)
    assert manifest["search_task_peak_rss_mb"] > 0
    for uri in outputs.shard_uris(folder):
        fs, path = storage.resolve(uri)
        assert pa.parquet.read_schema(path, filesystem=fs).equals(MINED, check_metadata=False)
    expected = brute_force_negatives(rows_of(f"{folder}/embeddings"), pairs, margin=0.0,
                                     num=4)
    by_id = {row["id"]: row for row in mined}
    mismatched = [i for i in expected if by_id[i]["neg_key"] != expected[i]]
    # Equal up to float16 ties: allow a handful of swapped near-ties, none systematic.
    assert len(mismatched) <= len(expected) // 20, mismatched[:5]
    for row in mined:
        assert row["pos_key"] not in row["neg_key"]          # never the positive itself
        assert len(set(row["neg_key"])) == len(row["neg_key"])
        assert all(s <= row["pos_score"] + 1e-3 for s in row["neg_score"])  # margin 0
        assert row["neg_score"] == sorted(row["neg_score"], reverse=True)
        assert len(row["neg_shard"]) == len(row["neg_row"]) == len(row["neg_key"])
        assert len(row["neg_key"]) == 4 or row["short"]
    # Negatives point at the right payload: the text and image of the target with that key,
    # and the pair at its own row; the table holds no image bytes.
    assert manifest["pairs_table"] == f"{config.run_root}/prepare_data/pairs"
    payload = {p["pos_key"]: (p["pos_text"], p["pos_image"]) for p in pairs}
    by_pair = {p["id"]: p for p in pairs}
    resolved = read_with_negatives(mined[:40], manifest["pairs_table"])
    for row in resolved:
        assert row["qry_text"] == by_pair[row["id"]]["qry_text"]
        assert row["given_neg_text"] == by_pair[row["id"]]["neg_text"]
        for text, image, key in zip(row["neg_text"], row["neg_image"], row["neg_key"],
                                    strict=True):
            assert payload[key] == (text, image)
    assert not any(isinstance(v, bytes) for row in mined for v in row.values())
    per_dataset = manifest["per_dataset"]
    assert set(per_dataset) == {"demo_t2i", "demo_i2t", "demo_cls", "demo_vqa"}
    # margin 0 leaves weak rows short of 4 among their first 12: searched again, deeper
    assert manifest["totals"]["searched_again"] > 0
    assert sum(d["queries"] for d in per_dataset.values()) == len(mined)
    assert storage.exists(f"{folder}/scores.png")


def write_pairs(path: str, rows: list[dict]) -> None:
    full = [{"dataset": "d", "source": "test", "qry_image": None, "pos_image": None,
             "neg_text": [], "neg_image": [], **r} for r in rows]
    storage.write_table(pa.Table.from_pylist(full, schema=PAIRS), path)


def test_miner_rejects_rows_without_positive_or_with_bad_image(tmp_path, miner):
    image = pack_image(red_png(), PackOptions(image_size=32))
    rows = [
        {"id": "ok", "qry_text": "find a red circle", "pos_text": "<|image_1|>",
         "pos_image": image.data, "pos_key": content_key("<|image_1|>", image)},
        {"id": "no-positive", "qry_text": "q", "pos_text": "  ", "pos_key": "k2"},
        {"id": "bad-image", "qry_text": "<|image_1|>\nq", "qry_image": b"\x89PNG broken",
         "pos_text": "a red circle", "pos_key": "k3"},
    ]
    write_pairs(str(tmp_path / "pairs.parquet"), rows)
    assert check_pair(rows[1])[0] == "missing_positive"
    worker = MinerShardWorker(miner, False, "instruction", 4, str(tmp_path / "out"), "h", 1)
    stats = worker(MinerEmbedTask(0, str(tmp_path / "pairs.parquet"), [0, 1, 2]))
    assert (stats["embedded"], stats["rejected"]) == (2, 2)  # query + target of "ok"
    rejects = storage.read_table(str(tmp_path / "out" / "embeddings" / "_rejects" /
                                     "part-00000.parquet")).to_pylist()
    assert {(r["id"], r["reason"], r["field"]) for r in rejects} == {
        ("no-positive", "missing_positive", "pos_text"),
        ("bad-image", "corrupt_image", "qry_image")}
    embedded = storage.read_table(str(tmp_path / "out" / "embeddings" / "part-00000.parquet"))
    assert embedded.column("kind").to_pylist() == ["query", "target"]
    assert embedded.column("key").to_pylist() == ["ok", rows[0]["pos_key"]]


def red_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), (220, 20, 20)).save(out, format="PNG")
    return out.getvalue()


def test_rerun_skips_finished_shards(ray_local, tmp_path, miner):
    config = load_config(DEMO, [*SMALL, f"output_root={tmp_path / 'run'}",
                                f"mining.miner={miner}", "data.rows_per_shard=40"])
    prepare_data(config)
    first = mine_negatives(config)
    folder = config.step_dir("mine_negatives")
    shards = outputs.shard_uris(folder)
    assert len(shards) == 3
    mtimes = {u: os.stat(u).st_mtime_ns for u in shards}
    os.remove(shards[0])
    os.remove(f"{folder}/_manifest.json")
    second = mine_negatives(config)
    assert second["shards_skipped"] == 2
    assert second["per_dataset"] == first["per_dataset"]
    assert [os.stat(u).st_mtime_ns == mtimes[u] for u in shards] == [False, True, True]


@pytest.mark.parametrize("override, message", [
    ("mining.search_k=2", "below mining.num_negatives"),
    ("mining.backend=faiss_gpu", "exceeds FAISS GPU's limit"),
])
def test_impossible_settings_fail_before_work(tmp_path, override, message):
    extra = ["mining.search_k=4096"] if "faiss_gpu" in override else []
    with pytest.raises(ValueError, match=message):  # a ConfigError: at load or the step's check
        mine_negatives(load_config(DEMO, [*SMALL, *extra, override, f"output_root={tmp_path}"]))
    assert not any(tmp_path.iterdir())


def test_ivf_recall_is_measured(ray_local, tmp_path, miner):
    config = load_config(DEMO, [*SMALL, f"output_root={tmp_path / 'run'}",
                                f"mining.miner={miner}", "mining.index=ivf",
                                "mining.ivf_nlist=2", "mining.ivf_nprobe=2"])
    prepare_data(config)
    manifest = mine_negatives(config)
    # nprobe = nlist searches every list: IVF is then exact and its recall is 1.
    assert manifest["ivf_recall"] == pytest.approx(1.0)
    assert manifest["rows_out"] == manifest["rows_in"]


def test_read_rows_returns_the_pointed_rows_in_pointer_order(tmp_path) -> None:
    from pipeline.data.mined import read_rows

    shards = [[{"id": f"s{s}r{r}", "pos_text": f"t{s}.{r}", "pos_key": f"k{s}{r}"}
               for r in range(5)] for s in range(3)]
    for s, rows in enumerate(shards):
        write_pairs(str(tmp_path / outputs.shard_name(s)), [{"qry_text": "q", **r} for r in rows])
    pointers = np.random.default_rng(0).integers(0, [3, 5], size=(25, 2))  # repeats included
    table = read_rows(str(tmp_path), pointers, ["id", "pos_text"])
    assert table.column("id").to_pylist() == [shards[s][r]["id"] for s, r in pointers]
    assert table.column_names == ["id", "pos_text"]
    assert read_rows(str(tmp_path), np.zeros((0, 2)), ["id"]).num_rows == 0
