"""Bad content of one row is that row's reject, never a crash that names nothing and never a
silent acceptance (no Ray): decompression bombs, unsupported vs corrupt images, high bit
depths, multi-frame images, image paths outside their root, bytes that are not UTF-8, huge
CSV fields, extra CSV cells; and every exception type of the project pickles (they cross
Ray task boundaries inside task arguments and results)."""
from __future__ import annotations

import importlib
import inspect
import io
import json
import pathlib
import pickle
import pkgutil
import resource
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.data import readers
from pipeline.data.images import (
    MAX_IMAGE_PIXELS,
    ImageDecodeError,
    PackOptions,
    decode_rgb,
    pack_image,
)
from pipeline.data.validate import ImageLoader, RowError, validate_pair, validate_text_group
from pipeline.outputs import REJECT_REASONS

pytestmark = pytest.mark.reliability


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def bomb_png() -> bytes:
    """A 20000 x 20000 one-bit PNG: 48 KB of file, 400 M pixels (1.2 GB as RGB)."""
    return encoded(Image.new("1", (20000, 20000)))


# ---------------------------------------------------------------------------------------
# Every exception type pickles


def project_exception_types() -> list[type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("pipeline."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[name] for name in sorted(found)]


def sample_instance(cls: type[BaseException]) -> BaseException:
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and p.default is p.empty]
    return cls(*[f"{p.name}-value" for p in params]) if params else cls("a message")


def test_every_project_exception_round_trips_through_pickle():
    types = project_exception_types()
    assert RowError in types and len(types) >= 10, [t.__name__ for t in types]
    for cls in types:
        err = sample_instance(cls)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == str(err), cls
        assert vars(back) == vars(err), cls


def test_row_error_keeps_its_fields_through_pickle():
    back = pickle.loads(pickle.dumps(RowError("missing_image", "image", "x.png")))
    assert (back.reason, back.field, back.detail) == ("missing_image", "image", "x.png")


# ---------------------------------------------------------------------------------------
# Images


def test_a_decompression_bomb_is_refused_from_its_header_in_bounded_memory(tmp_path):
    """In a fresh process (so the peak is this decode's): refused as image_too_large, and
    the peak RSS stays far below the 1.2 GB the pixels would take."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    code = ("import resource, sys\n"
            "from pipeline.data.images import pack_image, PackOptions, ImageDecodeError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n"
            "    pack_image(open(sys.argv[1], 'rb').read(), PackOptions(image_size=16))\n"
            "except ImageDecodeError as err:\n"
            "    print(err.reason)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120)
    reason, grown_mb = done.stdout.split()
    assert reason == "image_too_large", done.stderr
    assert int(grown_mb) < 100
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_an_image_just_over_the_pixel_limit_is_refused_and_one_under_is_not():
    side = int(MAX_IMAGE_PIXELS ** 0.5)
    over = encoded(Image.new("1", (side + 1, side + 1)))
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(over)
    assert err.value.reason == "image_too_large" and "pixels >" in str(err.value)
    assert decode_rgb(encoded(Image.new("1", (2000, 1000)))).size == (2000, 1000)


def unsupported_tiff() -> bytes:
    """A valid TIFF whose compression (34712, JPEG 2000) PIL has no decoder for."""
    raw = bytearray(encoded(Image.new("RGB", (16, 16), "red"), "TIFF"))
    directory = struct.unpack_from("<I", raw, 4)[0]
    for i in range(struct.unpack_from("<H", raw, directory)[0]):
        entry = directory + 2 + 12 * i
        if struct.unpack_from("<H", raw, entry)[0] == 259:  # Compression
            struct.pack_into("<H", raw, entry + 8, 34712)
    return bytes(raw)


@pytest.mark.parametrize("raw, reason", [
    (b"root:x:0:0:root:/root:/bin/bash\n", "unsupported_image"),
    (unsupported_tiff(), "unsupported_image"),
    (b"\x89PNG\r\n\x1a\n truncated", "corrupt_image"),
    (encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                               dtype=np.uint8)))[:2000],
     "corrupt_image"),  # cut short inside its pixel data
])
def test_unsupported_and_corrupt_images_are_told_apart(raw, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(raw)
    assert err.value.reason == reason, err.value
    assert reason in REJECT_REASONS


def test_high_bit_depth_images_are_scaled_not_saturated():
    ramp16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    ramp_float = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    wide_float = ramp_float * 1000.0 - 200.0                               # outside [0, 1]
    cases = [(Image.fromarray(ramp16), "PNG", ramp16 / 65535.0),
             (Image.fromarray(ramp16), "TIFF", ramp16 / 65535.0),
             (Image.fromarray(ramp_float), "TIFF", ramp_float),
             (Image.fromarray(wide_float), "TIFF", (wide_float + 200.0) / 1000.0)]
    for image, fmt, expected in cases:
        rgb = np.asarray(decode_rgb(encoded(image, fmt)), dtype=np.float64)
        assert rgb.shape == (64, 64, 3)
        assert np.abs(rgb[..., 0] - expected * 255.0).max() <= 0.51, (image.mode, fmt)


def test_multi_frame_images_keep_the_first_frame_and_count_the_others():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    packed = pack_image(gif, PackOptions(image_size=8))
    assert packed.frames_dropped == 2
    first = np.asarray(Image.open(io.BytesIO(packed.data)))
    assert first[..., 0].mean() > 200 and first[..., 2].mean() < 50  # red, the first frame
    assert pack_image(encoded(frames[0]), PackOptions(image_size=8)).frames_dropped == 0
    loader = ImageLoader(PackOptions(image_size=8), read=lambda uri: gif)
    loader.load("a.gif", "qry_image")
    loader.load("a.gif", "pos_image")  # the same file again: counted once
    assert loader.frames_dropped == 2


# ---------------------------------------------------------------------------------------
# Paths stay inside their root


@pytest.fixture()
def image_tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    picture = encoded(Image.new("RGB", (8, 8), "red"))
    (root / "img" / "ok.png").write_bytes(picture)
    (outside / "outside.png").write_bytes(picture)
    (root / "img" / "link.png").symlink_to(outside / "outside.png")
    return root


@pytest.mark.parametrize("path, inside", [
    ("img/ok.png", True), ("img/../img/ok.png", True), ("../outside/outside.png", False),
    ("../../../../etc/passwd", False), ("/etc/passwd", False), ("img/link.png", False)])
def test_image_paths_outside_the_root_are_rejected_without_opening(image_tree, path, inside):
    source = image_tree / "pairs.jsonl"
    source.write_text(json.dumps({"dataset": "d", "qry_text": "a red square",
                                  "pos_text": "", "pos_image": path}) + "\n")
    (raw,) = readers.read_pairs_jsonl(str(source), str(image_tree))
    opened = []

    def read(uri: str) -> bytes:
        opened.append(uri)
        return open(uri, "rb").read()

    loader = ImageLoader(PackOptions(image_size=8), read=read)
    if inside:
        assert validate_pair(raw, loader, 100)["pos_image"] is not None
        return
    with pytest.raises(RowError) as err:
        validate_pair(raw, loader, 100)
    assert (err.value.reason, err.value.field) == ("path_outside_root", "pos_image")
    assert path in err.value.detail and opened == []


def test_an_absolute_path_inside_the_root_is_accepted(image_tree):
    uri = readers._image_uri(str(image_tree), str(image_tree / "img" / "ok.png"))
    assert uri == str(image_tree / "img" / "ok.png")


@pytest.mark.parametrize("path, expected", [
    ("a/b.png", "s3://bucket/root/a/b.png"), ("a/../b.png", "s3://bucket/root/b.png"),
    ("../other/b.png", None), ("s3://bucket/rootx/b.png", None), ("s3://other/root/b", None)])
def test_s3_image_paths_are_normalised_and_kept_under_their_root(path, expected):
    got = readers._image_uri("s3://bucket/root", path)
    assert (got if isinstance(got, str) else None) == expected


# ---------------------------------------------------------------------------------------
# Text sources


def test_bytes_that_are_not_utf8_reject_their_row_naming_the_field(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b'{"dataset": "d", "qry_text": "caf\xe9 au lait", "pos_text": "ok"}\n'
                      b'{"dataset": "d", "qry_text": "fine", "pos_text": "ok"}\n')
    bad, good = readers.read_pairs_jsonl(str(jsonl), str(tmp_path))
    loader = ImageLoader(PackOptions(image_size=8))
    with pytest.raises(RowError) as err:
        validate_pair(bad, loader, 100)
    assert (err.value.reason, err.value.field) == ("bad_encoding", "qry_text")
    assert "caf\\xe9" in err.value.detail
    assert validate_pair(good, loader, 100)["qry_text"] == "fine"
    csv_path = tmp_path / "nli.csv"
    csv_path.write_bytes(b"sent0,sent1,hard_neg\na,b,c\nx,\xff\xfey,z\n")
    good, bad = readers.read_nli_csv(str(csv_path))
    assert validate_text_group(good, 100)["texts"] == ["a", "b", "c"]
    with pytest.raises(RowError) as err:
        validate_text_group(bad, 100)
    assert (err.value.reason, err.value.field) == ("bad_encoding", "sent1")


def test_a_huge_csv_field_is_its_rows_text_too_long_and_the_file_reads_on(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text("sent0,sent1,hard_neg\n" + f'"{"x" * 200_000}",b,c\n' + "d,e,f\n")
    huge, fine = readers.read_nli_csv(str(path))
    with pytest.raises(RowError) as err:
        validate_text_group(huge, 20_000)
    assert (err.value.reason, err.value.field) == ("text_too_long", "texts[0]")
    assert huge.source.endswith("nli.csv:2")
    assert validate_text_group(fine, 20_000)["texts"] == ["d", "e", "f"]
    import csv

    assert csv.field_size_limit() == 131072  # the reader restores the module's limit


def test_extra_csv_cells_reject_the_row(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text("sent0,sent1,hard_neg\na,b,c\na,b,c,surprise,more\n")
    good, extra = readers.read_nli_csv(str(path))
    assert validate_text_group(good, 100)["texts"] == ["a", "b", "c"]
    with pytest.raises(RowError) as err:
        validate_text_group(extra, 100)
    assert err.value.reason == "extra_cells" and "surprise" in err.value.detail


# ---------------------------------------------------------------------------------------
# Untrusted model files


class _Payload:
    """Unpickling this creates ``marker``: the code a malicious .bin would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_pickled_weights_file_is_refused_without_running_it(tmp_path):
    import torch

    from pipeline.models import Embedder, build_tiny_model

    folder = pathlib.Path(build_tiny_model("llava_next", tmp_path / "tiny"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"weights": _Payload(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        Embedder.from_pretrained(folder, device="cpu")
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the payload is real
    assert marker.exists()
