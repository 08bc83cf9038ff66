"""Tests of the synthetic demo world: formats, determinism and image/text consistency."""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import demo_world as dw

SMALL = {"num_train_images": 24, "num_eval_images": 20, "num_nli_groups": 40,
         "num_eval_candidates": 8, "image_size_px": 48}
PLACEHOLDER = "<|image_1|>"
_POSITION_BY_PHRASE = {phrase: pos for pos, phrase in dw.POSITION_PHRASES.items()}
_CLAUSE_OBJECT = re.compile(
    rf"\ban? (?:(?:small|large) )?({'|'.join(dw.COLORS)}) ({'|'.join(dw.SHAPES)})\b")
_CLAUSE_POSITION = re.compile("|".join(dw.POSITION_PHRASES.values()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dw.DemoWorldFiles:
    """The demo world with default arguments."""
    return dw.generate_demo_world(tmp_path_factory.mktemp("default") / "world")


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _descriptions(world: dw.DemoWorldFiles) -> dict[str, dict]:
    return {row["image_path"]: row for row in _jsonl(world.descriptions_jsonl)}


def _parse(caption: str) -> frozenset[tuple[str, str, str]]:
    """(colour, shape, position) triples said by a caption of any template."""
    triples = set()
    for clause in re.split(r", and |, | and ", caption):
        (color, shape), = _CLAUSE_OBJECT.findall(clause)
        position, = (_POSITION_BY_PHRASE[p] for p in _CLAUSE_POSITION.findall(clause))
        triples.add((color, shape, position))
    return frozenset(triples)


def _key(row: dict) -> frozenset[tuple[str, str, str]]:
    return frozenset((o["color"], o["shape"], o["position"]) for o in row["objects"])


def _words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z]+", text))


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _referenced_images(world: dw.DemoWorldFiles) -> dict[str, set[str]]:
    """Image paths referenced by each kind of file."""
    refs: dict[str, set[str]] = {"train": set(), "eval": set()}
    for path in world.mmeb_train.values():
        for row in _jsonl(path):
            refs["train"].update(p for p in (row["qry_image_path"], row["pos_image_path"],
                                             row["neg_image_path"]) if p)
    for path in world.mmeb_eval.values():
        for row in _jsonl(path):
            refs["eval"].update(p for p in [row["qry_img_path"], *row["tgt_img_path"]] if p)
    for path in world.sugarcrepe.values():
        refs["eval"].update(e["filename"] for e in json.loads(path.read_text()).values())
    retrieval = json.loads(world.retrieval_json.read_text())
    refs["eval"].update(e["filename"] for e in retrieval["images"])
    return refs


def test_same_arguments_give_identical_bytes_even_in_another_process(tmp_path: Path) -> None:
    first = dw.generate_demo_world(tmp_path / "a", seed=3, **SMALL)
    code = ("import sys; from pipeline.data.demo_world import generate_demo_world as g; "
            f"g(sys.argv[1], seed=3, **{SMALL!r})")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, env=env,
                   cwd=Path(__file__).resolve().parents[1])
    files_a, files_b = _all_files(first.root), _all_files(tmp_path / "b")
    assert len(files_a) > 50
    assert files_a.keys() == files_b.keys()
    assert [k for k in files_a if files_a[k] != files_b[k]] == []


def test_other_seed_gives_other_world(tmp_path: Path) -> None:
    a = _all_files(dw.generate_demo_world(tmp_path / "a", seed=0, **SMALL).root)
    b = _all_files(dw.generate_demo_world(tmp_path / "b", seed=1, **SMALL).root)
    assert a["images/train/00000.png"] != b["images/train/00000.png"]
    for name in ("nli/nli_for_simcse.csv", "mmeb_train/demo_t2i.jsonl",
                 "mmeb_eval/demo_compositional.jsonl", "retrieval/captions.json"):
        assert a[name] != b[name], name


def test_regenerating_replaces_a_world_but_refuses_a_foreign_folder(tmp_path: Path) -> None:
    dw.generate_demo_world(tmp_path / "w", **{**SMALL, "num_train_images": 30})
    files = dw.generate_demo_world(tmp_path / "w", **SMALL)
    assert len(list(files.train_image_dir.glob("*.png"))) == SMALL["num_train_images"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious.txt"):
        dw.generate_demo_world(tmp_path / "other", **SMALL)
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("override", [{"num_eval_candidates": 21}, {"seed": -1},
                                      {"num_train_images": 1}, {"image_size_px": 8}])
def test_bad_arguments_fail_early(tmp_path: Path, override: dict) -> None:
    with pytest.raises(ValueError):
        dw.generate_demo_world(tmp_path / "w", **{**SMALL, "num_eval_images": 20, **override})
    assert not (tmp_path / "w").exists()


def test_world_json_and_readme(world: dw.DemoWorldFiles) -> None:
    meta = json.loads(world.world_json.read_text())
    assert meta["version"] == dw.DEMO_WORLD_VERSION
    assert meta["arguments"] == {"seed": 0, "num_train_images": 320, "num_eval_images": 96,
                                 "num_nli_groups": 1024, "num_eval_candidates": 16,
                                 "image_size_px": 64}
    assert meta["counts"]["images/train"] == len(list(world.train_image_dir.glob("*.png")))
    assert "nli_for_simcse.csv" in world.readme.read_text()


def test_nli_csv_format_paraphrases_and_contradictions(world: dw.DemoWorldFiles) -> None:
    with world.nli_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sent0", "sent1", "hard_neg"]
    body = rows[1:]
    assert len(body) == 1024
    assert any("," in cell for row in body for cell in row)  # exercises csv quoting
    eval_keys = {_key(r) for r in _descriptions(world).values() if r["split"] == "eval"}
    anchors = set()
    for anchor, paraphrase, hard_neg in body:
        assert len({anchor, paraphrase, hard_neg}) == 3
        assert _parse(anchor) == _parse(paraphrase)
        assert _parse(hard_neg) != _parse(anchor)
        assert _parse(anchor) not in eval_keys
        anchors.add(_parse(anchor))
    assert len(anchors) == len(body)


def test_mmeb_train_rows(world: dw.DemoWorldFiles) -> None:
    assert set(world.mmeb_train) == set(dw.TRAIN_DATASETS) and len(world.mmeb_train) >= 4
    for name, path in world.mmeb_train.items():
        rows = _jsonl(path)
        assert len(rows) == 320
        with_neg = 0
        for row in rows:
            assert list(row) == ["qry", "qry_image_path", "pos_text", "pos_image_path",
                                 "neg_text", "neg_image_path"]
            assert all(isinstance(v, str) for v in row.values())
            for text, image in (("qry", "qry_image_path"), ("pos_text", "pos_image_path"),
                                ("neg_text", "neg_image_path")):
                assert (PLACEHOLDER in row[text]) == bool(row[image]), (name, row)
                assert row[image] == "" or row[image].startswith("images/train/")
            assert row["pos_text"] and row["qry"]
            if row["neg_text"]:
                with_neg += 1
                assert (row["neg_text"], row["neg_image_path"]) != (row["pos_text"],
                                                                   row["pos_image_path"])
        assert 0.3 * len(rows) < with_neg < 0.7 * len(rows), name


def test_mmeb_train_instructions_and_targets(world: dw.DemoWorldFiles) -> None:
    descriptions = _descriptions(world)
    for row in _jsonl(world.mmeb_train["demo_t2i"]):
        caption = row["qry"].removeprefix(dw.T2I_INSTRUCTION)
        assert row["qry"].startswith("Find me an everyday image that matches the given caption: ")
        assert row["pos_text"] == "<|image_1|>\nRepresent the given image."
        assert _parse(caption) == _key(descriptions[row["pos_image_path"]])
    for row in _jsonl(world.mmeb_train["demo_i2t"]):
        truth = _key(descriptions[row["qry_image_path"]])
        assert _parse(row["pos_text"]) == truth
        assert not row["neg_text"] or _parse(row["neg_text"]) != truth
    for row in _jsonl(world.mmeb_train["demo_cls"]):
        assert row["pos_text"] == descriptions[row["qry_image_path"]]["label"]
        assert row["pos_text"] in dw.CLASS_LABELS and row["neg_text"] != row["pos_text"]


def test_mmeb_eval_rows(world: dw.DemoWorldFiles) -> None:
    expected = {"demo_t2i": 16, "demo_i2t": 16, "demo_cls": len(dw.CLASS_LABELS),
                "demo_vqa": 16, "demo_compositional": 16}
    assert set(world.mmeb_eval) == set(expected)
    for name, path in world.mmeb_eval.items():
        rows = _jsonl(path)
        assert len(rows) >= 50, name
        for row in rows:
            assert list(row) == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) == expected[name]
            assert (PLACEHOLDER in row["qry_text"]) == bool(row["qry_img_path"])
            for text, image in zip(row["tgt_text"], row["tgt_img_path"], strict=True):
                assert (PLACEHOLDER in text) == bool(image)
            candidates = row["tgt_img_path"] if name == "demo_t2i" else row["tgt_text"]
            assert len(set(candidates)) == len(candidates), (name, row)


def test_mmeb_eval_ground_truth_is_candidate_zero(world: dw.DemoWorldFiles) -> None:
    descriptions = _descriptions(world)
    for row in _jsonl(world.mmeb_eval["demo_t2i"]):
        caption = row["qry_text"].removeprefix(dw.T2I_INSTRUCTION)
        matches = [p for p in row["tgt_img_path"] if _key(descriptions[p]) == _parse(caption)]
        assert matches == [row["tgt_img_path"][0]]
    for name in ("demo_i2t", "demo_compositional"):
        for row in _jsonl(world.mmeb_eval[name]):
            truth = _key(descriptions[row["qry_img_path"]])
            assert [_parse(t) == truth for t in row["tgt_text"]].index(True) == 0
            assert sum(_parse(t) == truth for t in row["tgt_text"]) == 1
    for row in _jsonl(world.mmeb_eval["demo_cls"]):
        assert row["tgt_text"][0] == descriptions[row["qry_img_path"]]["label"]
        assert sorted(row["tgt_text"]) == sorted(dw.CLASS_LABELS)


def test_vqa_answers_are_right(world: dw.DemoWorldFiles) -> None:
    descriptions = _descriptions(world)
    rows = _jsonl(world.mmeb_eval["demo_vqa"]) + _jsonl(world.mmeb_train["demo_vqa"])
    kinds = Counter()
    for row in rows:
        image = row.get("qry_img_path", row.get("qry_image_path"))
        answer = row["tgt_text"][0] if "tgt_text" in row else row["pos_text"]
        question = (row.get("qry_text") or row["qry"]).split("question: ")[1]
        objects = descriptions[image]["objects"]
        if m := re.fullmatch(r"What color is the (\w+) (.+)\?", question):
            kinds["color"] += 1
            position = _POSITION_BY_PHRASE[m.group(2)]
            truth = [o["color"] for o in objects
                     if o["shape"] == m.group(1) and o["position"] == position]
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
            kinds["shape"] += 1
            truth = [o["shape"] for o in objects if o["color"] == m.group(1)]
        elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
            kinds["position"] += 1
            truth = [o["position"] for o in objects
                     if (o["color"], o["shape"]) == m.groups()]
        else:
            assert question == "How many shapes are there?"
            kinds["count"] += 1
            truth = [dw.COUNT_WORDS[len(objects) - 1]]
        assert truth == [answer], (question, objects)
    assert set(kinds) == {"color", "shape", "position", "count"}


def test_vqa_candidates_are_clamped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=dw.__name__):
        files = dw.generate_demo_world(tmp_path / "w", **{**SMALL, "num_eval_candidates": 20})
    assert "demo_vqa" in caplog.text
    rows = _jsonl(files.mmeb_eval["demo_vqa"])
    assert {len(r["tgt_text"]) for r in rows} == {len(dw.VQA_ANSWERS)}
    assert {len(r["tgt_text"]) for r in _jsonl(files.mmeb_eval["demo_compositional"])} == {20}


def test_compositional_eval_defeats_bag_of_words(world: dw.DemoWorldFiles) -> None:
    descriptions = _descriptions(world)
    for row in _jsonl(world.mmeb_eval["demo_compositional"]):
        truth, *distractors = row["tgt_text"]
        same_words = [d for d in distractors if _words(d) == _words(truth)]
        objects = len(descriptions[row["qry_img_path"]]["objects"])
        assert objects >= 2
        # every re-binding of colours and shapes to positions comes first
        assert len(same_words) == min(len(distractors), 3 if objects == 2 else 35)
        assert distractors[:len(same_words)] == same_words


def test_sugarcrepe_files(world: dw.DemoWorldFiles) -> None:
    assert set(world.sugarcrepe) == set(dw.SUGARCREPE_CATEGORIES)
    descriptions = _descriptions(world)
    for category, path in world.sugarcrepe.items():
        entries = json.loads(path.read_text())
        assert list(entries) == [str(i) for i in range(len(entries))] and len(entries) > 50
        for entry in entries.values():
            assert set(entry) == {"filename", "caption", "negative_caption"}
            truth = _key(descriptions[entry["filename"]])
            assert entry["filename"].startswith("images/eval/")
            assert entry["caption"] == descriptions[entry["filename"]]["caption"]
            assert entry["negative_caption"] != entry["caption"]
            if category in dw.SWAP_CATEGORIES:
                assert _words(entry["negative_caption"]) == _words(entry["caption"])
            if category != "add_att":
                assert _parse(entry["negative_caption"]) != truth


def test_retrieval_captions(world: dw.DemoWorldFiles) -> None:
    data = json.loads(world.retrieval_json.read_text())
    descriptions = _descriptions(world)
    assert len(data["images"]) == 96
    for image in data["images"]:
        assert image["split"] == "test"
        raws = [s["raw"] for s in image["sentences"]]
        assert len(raws) == len(set(raws)) == 5
        assert {_parse(r) for r in raws} == {_key(descriptions[image["filename"]])}


def test_referenced_images_exist_are_rgb_and_train_eval_disjoint(
    world: dw.DemoWorldFiles,
) -> None:
    refs = _referenced_images(world)
    assert refs["train"] and refs["eval"] and not refs["train"] & refs["eval"]
    assert all(p.startswith("images/train/") for p in refs["train"])
    assert all(p.startswith("images/eval/") for p in refs["eval"])
    for path in refs["train"] | refs["eval"]:
        with Image.open(world.root / path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
    descriptions = _descriptions(world).values()
    train_keys = {_key(r) for r in descriptions if r["split"] == "train"}
    eval_keys = {_key(r) for r in descriptions if r["split"] == "eval"}
    assert len(eval_keys) == 96 and not train_keys & eval_keys


def _nearest_color(pixel: np.ndarray) -> str:
    palette = {**dw.COLOR_RGB, "background": dw.BACKGROUND_RGB}
    return min(palette, key=lambda n: float(np.sum((pixel - np.array(palette[n])) ** 2)))


def test_shapes_are_drawn_in_the_described_colour_and_place(world: dw.DemoWorldFiles) -> None:
    retrieval = json.loads(world.retrieval_json.read_text())["images"]
    for image in retrieval:  # the canonical caption, not the stored description
        said = {pos: color for color, _, pos in _parse(image["sentences"][0]["raw"])}
        pixels = np.asarray(Image.open(world.root / image["filename"]), dtype=np.float64)
        size = pixels.shape[0]
        for position, (fx, fy) in dw.POSITION_CENTERS.items():
            x, y = round(fx * size), round(fy * size)
            patch = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
            seen = Counter(_nearest_color(p) for p in patch).most_common(1)[0][0]
            assert seen == said.get(position, "background"), (image["filename"], position)


def test_class_label_is_the_largest_object(world: dw.DemoWorldFiles) -> None:
    for row in _jsonl(world.mmeb_eval["demo_cls"]):
        pixels = np.asarray(Image.open(world.root / row["qry_img_path"]), dtype=np.int32)
        colors = np.array(list(dw.COLOR_RGB.values()) + [dw.BACKGROUND_RGB])
        nearest = np.argmin(((pixels[:, :, None, :] - colors) ** 2).sum(-1), axis=-1)
        areas = np.bincount(nearest.ravel(), minlength=len(colors))[:-1]
        assert dw.COLORS[int(np.argmax(areas))] == row["tgt_text"][0].split()[0]
