"""Config: YAML + overrides, validation messages, stable hash, every field read."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys

import pytest

from pipeline.config import Config, ConfigError, iter_fields, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")


def test_yaml_and_overrides_are_typed():
    config = load_config(DEMO, ["data.image_size=32", "data.use_demo_world=false",
                                "output_root=s3://bucket/x", "data.image_format=jpeg"])
    assert config.data.image_size == 32 and isinstance(config.data.image_size, int)
    assert config.data.use_demo_world is False
    assert config.output_root == "s3://bucket/x"
    assert config.data.image_format == "jpeg"
    assert config.data.demo.num_nli_groups == 1000  # from the YAML, untouched


def test_float_knobs_accept_yaml_1_1_exponents():
    # PyYAML reads "1e-3" (no dot) as a string; float knobs take it as the number it is.
    config = load_config(DEMO, ["stage1.lr=1e-3", "mining.fn_ratio=9.5e-1"])
    assert config.stage1.lr == 1e-3 and config.mining.fn_ratio == 0.95
    with pytest.raises(ConfigError, match="stage1.lr: expected a number, got 'fast'"):
        load_config(DEMO, ["stage1.lr=fast"])


def test_frozen():
    config = load_config(DEMO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data.image_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, pattern", [
    ("data.imag_size=3", r"unknown config key 'data.imag_size'.*did you mean 'data.image_size'"),
    ("bogus=1", r"unknown config key 'bogus'.*allowed keys in <top level>: ablation, data, "),
    ("data.image_format=gif", r"data.image_format: 'gif' is not allowed; allowed values: "
                              r"png, jpeg"),
    ("data.image_size=big", r"data.image_size: expected an integer, got 'big'"),
    ("data.image_size=2", r"data.image_size: 2 is below the minimum 8"),
    ("data.jpeg_quality=101", r"data.jpeg_quality: 101 is above the maximum 100"),
    ("data.use_demo_world=3", r"data.use_demo_world: expected true or false"),
    ("data.demo=5", r"data.demo: expected a mapping"),
    ("data.image_size", r"must look like dotted.key=value"),
])
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEMO, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(bad))


def test_hash_is_stable_and_ignores_runtime_fields():
    a = load_config(DEMO)
    b = load_config(DEMO, ["ray.num_cpus=8", "storage.s3_endpoint_url=http://x:1",
                           "output_root=/tmp/elsewhere", "log_level=DEBUG"])
    c = load_config(DEMO, ["data.image_size=32"])
    assert a.config_hash == b.config_hash
    assert a.config_hash != c.config_hash
    assert re.fullmatch(r"demo-[0-9a-f]{10}", a.run_name)
    assert a.run_root == f"runs/{a.run_name}"
    assert b.run_root == "/tmp/elsewhere"
    assert a.step_dir("prepare_data") == f"runs/{a.run_name}/prepare_data"


def test_hash_is_stable_across_processes():
    code = ("from pipeline.config import load_config; "
            f"print(load_config({DEMO!r}).config_hash)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == load_config(DEMO).config_hash


def test_defaults_load_without_a_file():
    assert load_config(None) == Config()


def test_every_config_field_is_read_in_pipeline():
    """A declared but ignored knob is a lie to the user (STYLE.md).

    A field counts as read when pipeline code reads ``<section>.<field>`` (or
    ``config.<field>`` / ``self.<field>`` at the top level), or hands its whole section
    over with ``asdict(...<section>)`` to code that takes ``<field>`` by name.
    """
    files = {p: p.read_text() for p in (REPO / "pipeline").rglob("*.py")}
    sources = "\n".join(files.values())
    # Keyword use outside config.py (where every field is declared as `name: type = ...`).
    callees = "\n".join(text for path, text in files.items() if path.name != "config.py")
    unread = []
    for key, _field in iter_fields():
        *sections, leaf = key.split(".")
        if not sections:
            read = re.search(rf"\b(config|self)\.{leaf}\b", sources)
        else:
            section = sections[-1]
            read = re.search(rf"\b{section}\.{leaf}\b", sources) or (
                re.search(rf"asdict\((\w+\.)*{section}\)", sources)
                and re.search(rf"\b{leaf}\b\s*[:=]", callees))
        if not read:
            unread.append(key)
    assert not unread, f"config fields never read in pipeline/: {unread}"
