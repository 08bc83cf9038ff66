"""The teacher step: vectors equal SentenceTransformer.encode, rerun, rejects, truncation."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from pipeline import outputs, storage
from pipeline.config import load_config
from pipeline.models.teacher import resolve_teacher_path
from pipeline.steps.prepare_data import run as prepare_data
from pipeline.steps.teacher_embed import TeacherShardWorker, TeacherTask
from pipeline.steps.teacher_embed import run as teacher_embed

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
SMALL = ["data.demo.num_train_images=12", "data.demo.num_eval_images=8",
         "data.demo.num_nli_groups=40", "data.demo.num_eval_candidates=4",
         "data.demo.image_size_px=32", "data.image_size=16", "data.rows_per_shard=15",
         "teacher.num_actors=2", "teacher.batch_size=16"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_teacher_path(None)), device="cpu")


def read_groups(folder: str) -> tuple[list[str], list[list[str]], np.ndarray]:
    ids, texts, vectors = [], [], []
    for uri in outputs.shard_uris(folder):
        table = storage.read_table(uri)
        ids += table.column("id").to_pylist()
        for row_texts, row_emb in zip(table.column("texts").to_pylist(),
                                      table.column("teacher_emb").to_pylist(), strict=True):
            texts.append(row_texts)
            vectors += row_emb
    return ids, texts, np.asarray(vectors, dtype=np.float32)


def test_vectors_match_sentence_transformers(ray_local, tmp_path, reference_model):
    config = load_config(DEMO, [*SMALL, f"output_root={tmp_path / 'run'}"])
    prepare_data(config)
    manifest = teacher_embed(config)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (40, 40, 0)
    assert manifest["dim"] == 384 and manifest["texts_embedded"] == 120
    ids, texts, emb = read_groups(config.step_dir("teacher_embed"))
    assert sorted(ids) == sorted(f"nli:{i}" for i in range(40))
    assert all(len(t) == 3 for t in texts)
    flat = [t for group in texts for t in group]
    expected = reference_model.encode(flat, normalize_embeddings=True)  # (N, D)
    cosine = (emb * expected).sum(1) / np.linalg.norm(emb, axis=1)       # (N,)
    assert cosine.min() >= 0.9999, cosine.min()
    assert np.abs(np.linalg.norm(emb, axis=1) - 1).max() < 2e-3  # float16 storage

    # Rerun: a lost shard is redone alone; the others are not rewritten.
    folder = config.step_dir("teacher_embed")
    shards = outputs.shard_uris(folder)
    assert len(shards) == 3
    mtimes = {u: os.stat(u).st_mtime_ns for u in shards}
    os.remove(shards[2])
    os.remove(f"{folder}/_manifest.json")
    again = teacher_embed(config)
    assert again["shards_skipped"] == 2 and again["texts_embedded"] == 120
    assert [os.stat(u).st_mtime_ns == mtimes[u] for u in shards] == [True, True, False]
    assert np.array_equal(read_groups(folder)[2], emb)


@pytest.mark.reliability
def test_nan_vectors_reject_their_group(tmp_path):
    """One NaN vector rejects its whole group, with the reason and the text's position."""
    source = tmp_path / "in.parquet"
    import pyarrow as pa

    storage.write_table(pa.table({"id": ["a", "b", "c"],
                                  "texts": [["x y", "x z"], ["bad", "ok"], ["p", "q"]]}),
                        str(source))
    worker = TeacherShardWorker(teacher={"source": None}, batch_size=4,
                                folder=str(tmp_path / "out"), owner="h",
                                torch_threads=1)
    real_encode = worker.teacher.encode

    def encode(texts, batch_size):
        emb = real_encode(texts, batch_size)
        emb[texts.index("bad")] = np.nan
        return emb

    worker.teacher.encode = encode
    stats = worker(TeacherTask(0, str(source)))
    assert stats["texts"] == 6
    out = storage.read_table(str(tmp_path / "out" / "part-00000.parquet"))
    assert out.column("id").to_pylist() == ["a", "c"]
    rejects = storage.read_table(str(tmp_path / "out" / "_rejects" / "part-00000.parquet"))
    (reject,) = rejects.to_pylist()
    assert (reject["id"], reject["reason"], reject["field"]) == ("b", "nan_embedding",
                                                                "teacher_emb[0]")
    assert storage.read_json(str(tmp_path / "out" / "_stats" / "part-00000.json"))["texts"] == 6


def test_truncated_texts_are_counted(tmp_path):
    import pyarrow as pa

    source = tmp_path / "in.parquet"
    long_text = " ".join(["word"] * 30)
    storage.write_table(pa.table({"id": ["a"], "texts": [[long_text, "short"]]}), str(source))
    worker = TeacherShardWorker(teacher={"source": None, "max_seq_length": 8}, batch_size=4,
                                folder=str(tmp_path / "out"), owner="h",
                                torch_threads=1)
    stats = worker(TeacherTask(0, str(source)))
    assert stats["truncated"] == 1
    assert stats["tokens"] == sum(len(worker.teacher.model.tokenizer(t)["input_ids"])
                                  for t in [long_text, "short"])
