"""Readers, image packing, content keys and validation (no Ray)."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import readers
from pipeline.data.images import (
    ImageDecodeError,
    PackOptions,
    content_key,
    decode_rgb,
    pack_image,
)
from pipeline.data.schemas import IMAGE_PLACEHOLDER
from pipeline.data.validate import (
    ImageLoader,
    RowError,
    reject_record,
    validate_eval,
    validate_pair,
    validate_text_group,
)
from pipeline.outputs import REJECT_REASONS

P = IMAGE_PLACEHOLDER


def png_bytes(size=(40, 30), color=(200, 10, 10), mode="RGB", fmt="PNG") -> bytes:
    image = Image.new(mode, size, color if mode != "RGBA" else (*color, 128))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("resize, fmt", [("stretch", "png"), ("pad", "jpeg")])
def test_pack_image_resizes_to_rgb_square(resize, fmt):
    options = PackOptions(image_size=24, image_resize=resize, image_format=fmt)
    packed = pack_image(png_bytes(mode="RGBA"), options)
    image = Image.open(io.BytesIO(packed.data))
    assert image.size == (24, 24) and image.mode == "RGB"
    assert image.format == fmt.upper()


def test_pad_keeps_aspect_ratio():
    # A 40x20 red image padded to 20x20: top and bottom rows black, middle red.
    packed = pack_image(png_bytes(size=(40, 20)), PackOptions(image_size=20, image_resize="pad"))
    pixels = np.asarray(Image.open(io.BytesIO(packed.data)))
    assert pixels[0, 10].tolist() == [0, 0, 0]
    assert pixels[10, 10, 0] > 150 and pixels[10, 10, 1] < 60


def test_pixel_hash_ignores_source_encoding():
    options = PackOptions(image_size=16)
    a = pack_image(png_bytes(fmt="PNG"), options)
    b = pack_image(png_bytes(fmt="BMP"), options)
    c = pack_image(png_bytes(color=(10, 200, 10)), options)
    assert a.pixel_sha256 == b.pixel_sha256 != c.pixel_sha256
    assert content_key("x", a) == content_key("x", b)
    assert len({content_key("x", a), content_key("y", a), content_key("x", c),
                content_key("x", None)}) == 4


def test_corrupt_image_raises():
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_rgb(b"\x89PNG\r\n\x1a\n not really")


# ---------------------------------------------------------------------------------------
# Readers


def test_nli_csv(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1,hard_neg\na cat,"a cat, sitting",a dog\nx,y,\n')
    rows = readers.read_nli_csv(str(path))
    assert [r.id for r in rows] == ["nli:0", "nli:1"]
    assert rows[0].texts["texts"] == ["a cat", "a cat, sitting", "a dog"]
    assert rows[0].source.endswith("nli.csv:2")  # line 2 = first data row
    assert validate_text_group(rows[0], 100) == {"id": "nli:0",
                                                 "texts": ["a cat", "a cat, sitting", "a dog"]}
    with pytest.raises(RowError) as err:
        validate_text_group(rows[1], 100)
    assert (err.value.reason, err.value.field) == ("empty_text", "texts[2]")


def test_wrong_columns_fail_naming_the_file(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(readers.SourceError, match=r"nli.csv: missing column\(s\) sent0, sent1,"
                                                  r" hard_neg"):
        readers.read_nli_csv(str(path))
    with pytest.raises(readers.SourceError, match="source file not found"):
        readers.read_mmeb_train(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(readers.SourceError, match="no .jsonl/.parquet/.csv files"):
        readers.read_mmeb_eval(str(tmp_path / "empty"))


def test_mmeb_train_folder_jsonl_and_parquet(tmp_path):
    (tmp_path / "mmeb").mkdir()
    write_jsonl(tmp_path / "mmeb" / "A-OKVQA.jsonl", [
        {"qry": f"{P}\nWhat is it?", "qry_image_path": "img/a.png", "pos_text": "a cat",
         "pos_image_path": "", "neg_text": "", "neg_image_path": ""}])
    (tmp_path / "mmeb" / "bad.jsonl").write_text('{"qry": "q", "qry_image_path": "", '
                                                  '"pos_text": "p", "pos_image_path": ""}\n'
                                                  "{not json\n")
    table = pa.table({"qry": ["find a dog"], "qry_image_path": [""],
                      "pos_text": [f"{P}\nRepresent the given image."],
                      "pos_image_path": ["img/b.png"]})
    pq.write_table(table, tmp_path / "mmeb" / "MSCOCO_t2i.parquet")
    rows = readers.read_mmeb_train(str(tmp_path / "mmeb"), image_root=str(tmp_path))
    by_dataset = {r.dataset: r for r in rows}
    assert sorted(by_dataset) == ["A-OKVQA", "MSCOCO_t2i", "bad"]
    assert by_dataset["A-OKVQA"].image_uris["qry_image"] == str(tmp_path / "img" / "a.png")
    assert by_dataset["A-OKVQA"].image_uris["pos_image"] is None
    assert by_dataset["MSCOCO_t2i"].texts["qry_text"] == "find a dog"
    bad = [r for r in rows if r.parse_error]
    assert len(bad) == 1 and bad[0].source.endswith("bad.jsonl:2")


def test_mmeb_eval_lists(tmp_path):
    path = tmp_path / "demo_vqa.jsonl"
    write_jsonl(path, [{"qry_text": f"{P}\nq", "qry_img_path": "i.png",
                        "tgt_text": ["red", "blue"], "tgt_img_path": ["", ""]}])
    (row,) = readers.read_mmeb_eval(str(path))
    assert row.dataset == "demo_vqa" and row.id == "demo_vqa:0"
    assert row.image_uris["qry_image"] == str(tmp_path / "i.png")
    assert row.image_uris["tgt_image"] == [None, None]
    assert row.texts["tgt_text"] == ["red", "blue"]


def test_pairs_jsonl_ids_and_duplicates(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"id": "a", "dataset": "d", "qry_text": "q1", "pos_text": "p1"},
                       {"id": "a", "dataset": "d", "qry_text": "q2", "pos_text": "p2"},
                       {"dataset": "d", "qry_text": "q3", "pos_text": "p3"}])
    rows = readers.read_pairs_jsonl(str(path))
    assert [r.id for r in rows] == ["a", "a", "d:2"]
    assert readers.mark_duplicate_ids(rows) == 1
    assert rows[1].duplicate_of == rows[0].source and rows[0].duplicate_of is None
    loader = ImageLoader(PackOptions(image_size=8))
    with pytest.raises(RowError) as err:
        validate_pair(rows[1], loader, 100)
    assert err.value.reason == "duplicate_id" and "pairs.jsonl:1" in err.value.detail


# ---------------------------------------------------------------------------------------
# Validation of pairs and eval rows


@pytest.fixture
def images(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "same.bmp").write_bytes(png_bytes(fmt="BMP"))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    return tmp_path


def pair(images, **fields) -> readers.RawRow:
    record = {"qry": "find the red one", "qry_image_path": "", "pos_text": "",
              "pos_image_path": "ok.png", "neg_text": "", "neg_image_path": ""}
    record.update(fields)
    path = images / "t.jsonl"
    write_jsonl(path, [record])
    return readers.read_mmeb_train(str(path))[0]


def test_valid_pair_gets_placeholder_key_and_packed_image(images):
    loader = ImageLoader(PackOptions(image_size=8))
    row = validate_pair(pair(images), loader, 100)
    assert row["pos_text"] == P and row["qry_text"] == "find the red one"
    assert Image.open(io.BytesIO(row["pos_image"])).size == (8, 8)
    assert row["qry_image"] is None and row["neg_text"] == [] and row["neg_image"] == []
    # The same pixels from another file give the same content key.
    same = validate_pair(pair(images, pos_image_path="same.bmp"), loader, 100)
    assert same["pos_key"] == row["pos_key"]
    other = validate_pair(pair(images, pos_text=f"{P}\nother words"), loader, 100)
    assert other["pos_key"] != row["pos_key"]


def test_given_negatives_are_kept(images):
    loader = ImageLoader(PackOptions(image_size=8))
    row = validate_pair(pair(images, neg_text="a blue square", neg_image_path="ok.png"),
                        loader, 100)
    assert row["neg_text"] == [f"{P}\na blue square"]
    assert len(row["neg_image"]) == 1 and row["neg_image"][0] is not None


@pytest.mark.parametrize("fields, reason, field", [
    ({"pos_image_path": "nope.png"}, "missing_image", "pos_image"),
    ({"pos_image_path": "corrupt.png"}, "corrupt_image", "pos_image"),
    ({"qry": "   "}, "empty_text", "qry_text"),
    ({"qry": 42}, "wrong_type", "qry_text"),
    ({"qry": None}, "missing_field", "qry_text"),
    ({"qry": "x" * 101}, "text_too_long", "qry_text"),
    ({"qry": f"{P} what is this?"}, "placeholder_mismatch", "qry_text"),
    ({"neg_image_path": "corrupt.png"}, "corrupt_image", "neg_image[0]"),
])
def test_bad_pairs_are_rejected_with_reason(images, fields, reason, field):
    raw = pair(images, **fields)
    with pytest.raises(RowError) as err:
        validate_pair(raw, ImageLoader(PackOptions(image_size=8)), 100)
    assert (err.value.reason, err.value.field) == (reason, field)
    assert reason in REJECT_REASONS
    record = reject_record(raw, err.value)
    assert record["source"].endswith("t.jsonl:1") and record["id"] == "t:0"
    assert json.loads(record["row_json"])["pos_text"] == raw.values["pos_text"]


def eval_row(tmp_path, **fields) -> readers.RawRow:
    record = {"qry_text": f"{P}\nWhat color?", "qry_img_path": "ok.png",
              "tgt_text": ["red", "blue"], "tgt_img_path": ["", ""]}
    record.update(fields)
    path = tmp_path / "e.jsonl"
    write_jsonl(path, [record])
    return readers.read_mmeb_eval(str(path))[0]


def test_eval_row_references_image_keys(images):
    ok = str(images / "ok.png")
    keys = {ok: "k-ok", str(images / "nope.png"): RowError("missing_image", "image", "gone")}
    row = validate_eval(eval_row(images), keys, 100)
    assert row["qry_image_key"] == "k-ok" and row["tgt_image_key"] == [None, None]
    assert row["tgt_text"] == ["red", "blue"]
    images_row = validate_eval(eval_row(images, qry_img_path="", qry_text="a red circle",
                                        tgt_text=["", "x"], tgt_img_path=["ok.png", "ok.png"]),
                               keys, 100)
    assert images_row["tgt_text"] == [P, f"{P}\nx"]
    assert images_row["tgt_image_key"] == ["k-ok", "k-ok"]
    for fields, reason in [({"tgt_text": ["a"], "tgt_img_path": ["", ""]}, "bad_candidates"),
                           ({"tgt_text": [], "tgt_img_path": []}, "bad_candidates"),
                           ({"tgt_text": "red"}, "wrong_type"),
                           ({"qry_img_path": "nope.png"}, "missing_image")]:
        with pytest.raises(RowError) as err:
            validate_eval(eval_row(images, **fields), keys, 100)
        assert err.value.reason == reason
