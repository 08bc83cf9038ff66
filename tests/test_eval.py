"""Evaluation: metrics by hand (ties, varying candidates, several captions per image,
categories, overall means), an oracle and a constant model through the step, the MMEB
reader path against an in-process recomputation, and the report on the small demo."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import outputs, storage
from pipeline.config import load_config
from pipeline.data.schemas import EVAL_IMAGES, EVAL_QUERIES
from pipeline.eval import embed
from pipeline.eval.embed import Embedded, load_embedded
from pipeline.eval.metrics import (
    MMEB_DATASETS,
    compositional_accuracy,
    correct_at_1,
    mmeb_summary,
    precision_at_1,
    retrieval_recall,
)
from pipeline.eval.models import parse_models
from pipeline.eval.sets import Items, read_mmeb
from pipeline.outputs import OutputConflictError
from pipeline.steps.evaluate import run as evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")


# ---------------------------------------------------------------------------------------
# Metrics by hand


def test_precision_at_1_ties_count_against_the_ground_truth():
    scores = np.array([
        [0.9, 0.1, 0.2],   # ground truth strictly best: correct
        [0.5, 0.5, 0.1],   # tied with a distractor: wrong
        [0.1, 0.9, 0.0],   # a distractor wins: wrong
        [0.4, 0.3, 0.4],   # tied with the last distractor: wrong
    ])
    assert correct_at_1(scores).tolist() == [True, False, False, False]
    assert precision_at_1(scores) == 25.0
    # A constant model scores 0 (an argmax rule would give it 100: candidate 0 first).
    assert precision_at_1(np.full((5, 7), 0.3)) == 0.0
    assert np.argmax(np.full(7, 0.3)) == 0


def test_precision_at_1_varying_candidate_counts():
    scores = [np.array([0.2]),                    # only the ground truth: correct
              np.array([0.2, 0.1, 0.3, 0.0]),     # beaten at index 2: wrong
              np.array([0.7, 0.6]),               # correct
              np.array([0.1, -0.2, 0.0, 0.05, 0.09, -1.0])]  # correct
    assert correct_at_1(scores).tolist() == [True, False, True, True]
    assert precision_at_1(scores) == 75.0
    square = np.array([[0.3, 0.2, 0.1], [0.0, 0.2, 0.1]])
    assert precision_at_1(list(square)) == precision_at_1(square) == 50.0
    with pytest.raises(ValueError, match="at least one candidate"):
        correct_at_1([np.array([])])


def test_mmeb_constants():
    tasks = [t for t, _ in MMEB_DATASETS.values()]
    assert len(MMEB_DATASETS) == 36
    assert [tasks.count(t) for t in ("classification", "vqa", "retrieval", "grounding")] == \
        [10, 10, 12, 4]
    labels = [lab for _, lab in MMEB_DATASETS.values()]
    assert (labels.count("ind"), labels.count("ood")) == (20, 16)


def test_mmeb_overall_means_by_hand():
    per_dataset = {"ImageNet-1K": 50.0, "Place365": 30.0, "OK-VQA": 60.0, "MSCOCO_t2i": 40.0,
                   "VisDial": 20.0, "RefCOCO": 90.0, "my_set": 10.0}
    out = mmeb_summary(per_dataset)
    assert out["metatask:classification"] == pytest.approx(40.0)     # (50 + 30) / 2
    assert out["metatask:vqa"] == pytest.approx(60.0)
    assert out["metatask:retrieval"] == pytest.approx(30.0)          # (40 + 20) / 2
    assert out["metatask:grounding"] == pytest.approx(90.0)
    assert out["overall_mean_of_metatasks"] == pytest.approx((40 + 60 + 30 + 90) / 4)
    assert out["overall_mean_of_datasets"] == pytest.approx(300 / 7)  # unmapped counts here
    assert out["in_distribution_mean"] == pytest.approx((50 + 60 + 40 + 20) / 4)
    assert out["out_of_distribution_mean"] == pytest.approx((30 + 90) / 2)
    assert out["unmapped"] == ["my_set"] and out["metatasks_missing"] == []
    extra = mmeb_summary(per_dataset, {"my_set": "vqa"})
    assert extra["metatask:vqa"] == pytest.approx(35.0)
    assert extra["overall_mean_of_metatasks"] == pytest.approx((40 + 35 + 30 + 90) / 4)
    demo = mmeb_summary({"demo_cls": 10.0, "demo_vqa": 20.0, "demo_t2i": 30.0,
                         "demo_i2t": 50.0, "demo_compositional": 70.0})
    assert demo["metatask:retrieval"] == pytest.approx(50.0)
    assert demo["overall_mean_of_metatasks"] == pytest.approx((10 + 20 + 50) / 3)
    assert demo["overall_mean_of_datasets"] == pytest.approx(36.0)
    assert demo["metatasks_missing"] == ["grounding"]
    assert "in_distribution_mean" not in demo


def test_retrieval_recall_three_images_six_captions_by_hand():
    # With identity image vectors, sim[caption t, image i] = txt_emb[t, i].
    img_emb = np.eye(3, dtype=np.float32)
    txt_emb = np.array([
        [0.9, 0.1, 0.2],    # t0 -> img0: best                      t2i wrong >= gt: 0
        [0.3, 0.5, 0.55],   # t1 -> img0: img1, img2 above          2
        [0.2, 0.6, 0.6],    # t2 -> img1: tied with img2            1 (tie counts against)
        [0.1, 0.8, 0.3],    # t3 -> img1                            0
        [0.9, 0.0, 0.1],    # t4 -> img2: img0 above                1
        [0.0, 0.2, 0.5],    # t5 -> img2                            0
    ], dtype=np.float32)
    txt_to_img = np.array([0, 0, 1, 1, 2, 2])
    # image -> text: img0's best own caption (t0, 0.9) tied with t4: 1 wrong; img1's best
    # (t3, 0.8): 0 wrong; img2's best (t5, 0.5) below t1 (0.55) and t2 (0.6): 2 wrong.
    out = retrieval_recall(img_emb, txt_emb, txt_to_img, ks=(1, 2, 3, 5, 10))
    expected = {"t2i_R@1": 300 / 6, "t2i_R@2": 500 / 6, "t2i_R@3": 100.0, "t2i_R@5": 100.0,
                "t2i_R@10": 100.0, "i2t_R@1": 100 / 3, "i2t_R@2": 200 / 3, "i2t_R@3": 100.0,
                "i2t_R@5": 100.0, "i2t_R@10": 100.0}
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    assert retrieval_recall(img_emb, txt_emb, txt_to_img, ks=(1,), block_size=2) == \
        {"t2i_R@1": pytest.approx(50.0), "i2t_R@1": pytest.approx(100 / 3)}
    constant = retrieval_recall(img_emb, np.ones((6, 3), np.float32), txt_to_img, ks=(1, 2))
    assert constant == {"t2i_R@1": 0.0, "t2i_R@2": 0.0, "i2t_R@1": 0.0, "i2t_R@2": 0.0}


def test_retrieval_recall_matches_sorting_without_ties():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 8)).astype(np.float32)
    txt = rng.normal(size=(60, 8)).astype(np.float32)
    txt_to_img = rng.integers(0, 20, size=60)
    sim = txt @ img.T                                              # (T, I)
    t2i_rank = [int(np.flatnonzero(np.argsort(-s) == g)[0]) for s, g in zip(sim, txt_to_img,
                                                                             strict=True)]
    i2t_rank = [min(int(np.flatnonzero(np.argsort(-sim[:, i]) == t)[0])
                    for t in np.flatnonzero(txt_to_img == i)) for i in np.unique(txt_to_img)]
    out = retrieval_recall(img, txt, txt_to_img, ks=(1, 5, 10), block_size=7)
    for k in (1, 5, 10):
        assert out[f"t2i_R@{k}"] == pytest.approx(100 * np.mean(np.asarray(t2i_rank) < k))
        assert out[f"i2t_R@{k}"] == pytest.approx(100 * np.mean(np.asarray(i2t_rank) < k))


def test_compositional_accuracy_per_category():
    img = np.eye(2, dtype=np.float32)[[0, 0, 1, 1, 1]]               # (5, 2)
    pos = np.array([[1.0, 0], [0.2, 0], [0, 0.9], [0, 0.5], [0, 0.4]], np.float32)
    neg = np.array([[0.5, 0], [0.3, 0], [0, 0.1], [0, 0.2], [0, 0.4]], np.float32)
    out = compositional_accuracy(img, pos, neg, ["swap_att", "swap_att", "add_obj",
                                                 "add_obj", "add_obj"])
    assert out["swap_att"] == pytest.approx(50.0)           # second row: negative wins
    assert out["add_obj"] == pytest.approx(200 / 3)         # last row: a tie is wrong
    assert out["mean"] == pytest.approx((50.0 + 200 / 3) / 2)


def test_parse_models():
    assert parse_models(["base=student", "stage1", "x=/m/x", "/a/b/tiny/"]) == {
        "base": "student", "stage1": "stage1", "x": "/m/x", "tiny": "/a/b/tiny/"}
    with pytest.raises(ValueError, match="appears twice"):
        parse_models(["stage1", "stage1=/x"])
    with pytest.raises(ValueError, match="label=path"):
        parse_models(["bad label=/x"])


# ---------------------------------------------------------------------------------------
# The step with a stand-in embedding (in-process, no Ray)


def write_eval_tables(run_root: str, rows: list[dict]) -> None:
    tables = (("eval", EVAL_QUERIES, rows), ("eval_images", EVAL_IMAGES, []))
    for name, schema, table_rows in tables:
        folder = f"{run_root}/prepare_data/{name}"
        storage.write_table(pa.Table.from_pylist(table_rows, schema=schema),
                            f"{folder}/part-00000.parquet")
        outputs.write_manifest(folder, {"rows_in": len(table_rows), "rows_out": len(table_rows),
                                        "rows_rejected": 0, "config_hash": "test",
                                        "seconds": 0.0})


def eval_row(row_id: str, dataset: str, query: str, candidates: list[str]) -> dict:
    return {"id": row_id, "dataset": dataset, "qry_text": query, "qry_image_key": None,
            "tgt_text": candidates, "tgt_image_key": [None] * len(candidates), "source": "test"}


def oracle_embed(config, models, items, image_rows, folder, owner_hash):
    """'oracle': query q<r> and its ground truth gt<r> share a one-hot vector, distractors
    get their own; 'constant': one vector for everything. Query 'q_bad' cannot be embedded."""
    texts = sorted({it.text.removeprefix("q").removeprefix("gt") for it in items})
    dim = len(texts)
    out = {}
    for label in models:
        emb = np.zeros((len(items), dim), np.float32)
        for i, it in enumerate(items):
            if label == "oracle":
                emb[i, texts.index(it.text.removeprefix("q").removeprefix("gt"))] = 1.0
            else:
                emb[i] = 1.0 / np.sqrt(dim)
        error = np.asarray(["nan_embedding" if it.text == "q_bad" else "" for it in items],
                           dtype=object)
        out[label] = Embedded(emb, error, np.asarray(["stand-in"] * len(items), dtype=object))
    return out


def test_oracle_scores_100_constant_scores_0_and_rerun_is_skipped(tmp_path, monkeypatch):
    run_root = str(tmp_path / "run")
    rows = [eval_row(f"cls:{r}", "ImageNet-1K", f"q{r}", [f"gt{r}", "d0", "d1", "d2"])
            for r in range(3)]
    rows += [eval_row("t2i:0", "MSCOCO_t2i", "q3", ["gt3", "d0"]),
             eval_row("t2i:1", "MSCOCO_t2i", "q4", ["gt4", "d1", "d2", "d3", "d4", "gt0"]),
             eval_row("bad:0", "ImageNet-1K", "q_bad", ["gt5", "d0"])]
    write_eval_tables(run_root, rows)
    models = {"oracle": str(tmp_path), "constant": str(tmp_path)}
    seen = {}

    def stand_in(config, refs, items, *args):
        seen["items"] = list(items)
        return oracle_embed(config, refs, items, *args)

    monkeypatch.setattr(embed, "embed_items", stand_in)
    config = load_config(None, [f"output_root={run_root}", "data.use_demo_world=false"])
    manifest = evaluate(config, models)
    items = seen["items"]
    assert len(items) == len(set(items)) == 6 + 6 + 5   # queries, ground truths, d0..d4
    report = storage.read_json(f"{run_root}/evaluate/report.json")
    oracle, constant = report["results"]["oracle"]["mmeb"], report["results"]["constant"]["mmeb"]
    assert oracle["ImageNet-1K"] == oracle["MSCOCO_t2i"] == 100.0
    assert oracle["overall_mean_of_datasets"] == oracle["overall_mean_of_metatasks"] == 100.0
    assert constant["ImageNet-1K"] == constant["MSCOCO_t2i"] == 0.0   # ties are wrong
    assert report["sets"]["mmeb"] == {"rows": 6, "scored": 5,
                                      "per_group": {"ImageNet-1K": 3, "MSCOCO_t2i": 2}}
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (6, 5, 1)
    rejects = storage.read_table(f"{run_root}/evaluate/_rejects/part-00000.parquet").to_pylist()
    assert [(r["id"], r["field"], r["reason"]) for r in rejects] == \
        [("bad:0", "qry_text", "nan_embedding")]
    for name in ("report.md", "mmeb.png", "_manifest.json"):
        assert storage.exists(f"{run_root}/evaluate/{name}")

    def fail(*args):
        raise AssertionError("a complete evaluation must not embed again")

    monkeypatch.setattr(embed, "embed_items", fail)
    assert evaluate(config, models)["written_at"] == manifest["written_at"]
    other = load_config(None, [f"output_root={run_root}", "data.use_demo_world=false",
                               "eval.prompt_mode=raw"])
    with pytest.raises(OutputConflictError, match="other settings"):
        evaluate(other, models)


def test_missing_model_fails_before_any_work(tmp_path):
    write_eval_tables(str(tmp_path / "run"), [eval_row("a", "VOC2007", "q", ["t", "u"])])
    config = load_config(None, [f"output_root={tmp_path / 'run'}", "data.use_demo_world=false"])
    with pytest.raises(FileNotFoundError, match=r"eval.models: model 'stage1'.*run stage1 first"):
        evaluate(config)
    with pytest.raises(FileNotFoundError, match=r"tiny student .* is built by stage1"):
        evaluate(config, {"base": "student"})
    assert not storage.exists(str(tmp_path / "run" / "evaluate"))
    assert not storage.exists(str(tmp_path / "run" / "models"))  # evaluate builds no model


# ---------------------------------------------------------------------------------------
# Through Ray: the MMEB reader path and the demo report


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from pipeline.models import build_tiny_model

    return build_tiny_model("qwen2_vl", str(tmp_path_factory.mktemp("tiny")), seed=0)


def write_mmeb_eval_files(root: pathlib.Path) -> None:
    """Hand-written rows in the public MMEB-eval layout, four datasets + one bad row."""
    colors = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 80, 220)}
    (root / "images").mkdir(parents=True)
    for name, rgb in colors.items():
        Image.new("RGB", (40, 40), rgb).save(root / "images" / f"{name}.png")
    img = {c: f"images/{c}.png" for c in colors}
    target = "<|image_1|>\nRepresent the given image."
    files = {
        "ImageNet-1K": [
            {"qry_text": "<|image_1|>\nRepresent the given image for classification",
             "qry_img_path": img[c], "tgt_text": [c] + [o for o in colors if o != c],
             "tgt_img_path": ["", "", ""]} for c in colors],
        "OK-VQA": [
            {"qry_text": "<|image_1|>\nRepresent the given image with the following question: "
                         "what color is it?", "qry_img_path": img[c],
             "tgt_text": [c, "circle", "two", "left"], "tgt_img_path": ["", "", "", ""]}
            for c in colors],
        "MSCOCO_t2i": [
            {"qry_text": f"Find me an everyday image that matches the given caption: a {c} "
                         "square", "qry_img_path": "", "tgt_text": [target] * 3,
             "tgt_img_path": [img[c]] + [img[o] for o in colors if o != c]} for c in colors]
        + [{"qry_text": "a bad row", "qry_img_path": "", "tgt_text": ["a", "b"],
            "tgt_img_path": [""]}],   # unequal candidate lists: refused by prepare
        "RefCOCO": [
            {"qry_text": f"<|image_1|>\nSelect the portion of the image that follows the "
                         f"language expressions. the {c} one", "qry_img_path": img[c],
             "tgt_text": [target, target], "tgt_img_path": [img[c], img["red" if c != "red"
                                                                         else "blue"]]}
            for c in colors],
    }
    (root / "mmeb_eval").mkdir()
    for name, rows in files.items():
        with open(root / "mmeb_eval" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.mark.integration
def test_mmeb_reader_path_matches_in_process_embedder(ray_local, tmp_path, tiny_model):
    from pipeline.models import Embedder
    from pipeline.steps.prepare_data import run as prepare_data

    write_mmeb_eval_files(tmp_path / "src")
    config = load_config(None, [
        f"output_root={tmp_path / 'run'}", "data.use_demo_world=false", "data.image_size=32",
        f"data.sources.mmeb_eval={tmp_path / 'src' / 'mmeb_eval'}",
        f"data.sources.mmeb_eval_images={tmp_path / 'src'}", "eval.num_actors=1",
        "eval.items_per_task=7", "ray.progress_bars=false"])
    prepared = prepare_data(config)
    assert prepared["tables"]["eval"]["rows_rejected"] == 1
    manifest = evaluate(config, {"tiny": tiny_model})
    report = storage.read_json(f"{config.run_root}/evaluate/report.json")
    mmeb = report["results"]["tiny"]["mmeb"]
    assert {"ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "RefCOCO", "overall_mean_of_datasets",
            "overall_mean_of_metatasks", "in_distribution_mean", "out_of_distribution_mean",
            "metatask:classification", "metatask:vqa", "metatask:retrieval",
            "metatask:grounding"} == set(mmeb)
    assert set(report["sets"]) == {"mmeb"} and report["mmeb"]["metatasks_missing"] == []
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (12, 12, 0)

    # Recompute every query's scores in-process with the same Embedder.
    prep = f"{config.run_root}/prepare_data"
    images = {r["key"]: r["image"] for u in outputs.shard_uris(f"{prep}/eval_images")
              for r in storage.read_table(u).to_pylist()}
    rows = [r for u in outputs.shard_uris(f"{prep}/eval")
            for r in storage.read_table(u).to_pylist()]
    embedder = Embedder.from_pretrained(tiny_model)
    per_dataset: dict[str, list[np.ndarray]] = {}
    vectors: dict[tuple[str, str | None], np.ndarray] = {}
    for r in rows:
        texts = [r["qry_text"], *r["tgt_text"]]
        keys = [r["qry_image_key"], *r["tgt_image_key"]]
        emb = embedder.encode(texts=texts, images=[images[k] if k else None for k in keys],
                              batch_size=4, mode="instruction").numpy()
        per_dataset.setdefault(r["dataset"], []).append(emb[1:] @ emb[0])
        vectors.update(zip(zip(texts, keys, strict=True), emb, strict=True))
    # The step's stored vectors are the same Embedder's, item by item (each item once).
    items = Items()
    read_mmeb(f"{prep}/eval", items, "instruction")
    stored = load_embedded(f"{config.run_root}/evaluate/embeddings/tiny", len(items))
    assert len(items) == len(vectors) < sum(1 + len(r["tgt_text"]) for r in rows)
    for i, item in enumerate(items.items):
        key = (item.text, item.image[1] if item.image else None)
        np.testing.assert_allclose(stored.emb[i], vectors[key], atol=2e-5)
    expected = {d: precision_at_1(s) for d, s in per_dataset.items()}
    assert {d: mmeb[d] for d in expected} == expected
    assert mmeb["overall_mean_of_datasets"] == pytest.approx(np.mean(list(expected.values())))
    assert mmeb["overall_mean_of_metatasks"] == pytest.approx(np.mean(list(expected.values())))
    assert mmeb["out_of_distribution_mean"] == pytest.approx(expected["RefCOCO"])


@pytest.mark.integration
def test_demo_report_json_md_png(ray_local, tmp_path):
    from pipeline.models import build_tiny_model
    from pipeline.steps.prepare_data import run as prepare_data

    run_root = tmp_path / "run"
    # Stage 1 builds the tiny student there (seed train.seed = 0); the other model differs.
    build_tiny_model("qwen2_vl", str(run_root / "models" / "tiny-qwen2_vl"), seed=0)
    other = build_tiny_model("qwen2_vl", str(tmp_path / "other"), seed=1)
    config = load_config(DEMO, [
        "data.demo.num_train_images=8", "data.demo.num_eval_images=8",
        "data.demo.num_nli_groups=8", "data.demo.num_eval_candidates=4",
        "data.demo.image_size_px=32", "data.image_size=32", "data.rows_per_shard=50",
        f"output_root={run_root}", "model.path=tiny:qwen2_vl",
        f"eval.models=[base=student,other={other}]", "eval.items_per_task=64",
        "eval.num_actors=2", "ray.progress_bars=false"])
    prepare_data(config)
    manifest = evaluate(config)
    folder = config.step_dir("evaluate")
    report = storage.read_json(f"{folder}/report.json")
    assert list(report["models"]) == ["base", "other"]
    assert report["models"]["base"]["path"].endswith("models/tiny-qwen2_vl")
    assert set(report["sets"]) == {"mmeb", "sugarcrepe", "retrieval"}
    for label in ("base", "other"):
        result = report["results"][label]
        assert {"demo_cls", "demo_vqa", "demo_t2i", "demo_i2t", "demo_compositional",
                "overall_mean_of_datasets", "overall_mean_of_metatasks"} <= set(result["mmeb"])
        assert {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5",
                "i2t_R@10"} == set(result["retrieval"])
        assert "mean" in result["sugarcrepe"] and "swap_att" in result["sugarcrepe"]
        assert all(0.0 <= v <= 100.0 for s in result.values() for v in s.values())
    # Two different random models: different numbers (equal ones would mean a mix-up).
    assert report["results"]["base"] != report["results"]["other"]
    assert report["sets"]["retrieval"]["rows"] == 8
    assert manifest["rows_in"] == manifest["rows_out"] == sum(
        s["rows"] for s in report["sets"].values())
    md = storage.read_bytes(f"{folder}/report.md").decode()
    assert "| overall_mean_of_metatasks |" in md and "| base | other |" in md
    for name in ("mmeb", "sugarcrepe", "retrieval"):
        assert storage.read_bytes(f"{folder}/{name}.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluate(config)["written_at"] == manifest["written_at"]   # complete: skipped
