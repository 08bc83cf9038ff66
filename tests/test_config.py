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
    config = load_config(DEMO, ["stage1.optim.lr=1e-3", "mining.fn_ratio=9.5e-1"])
    assert config.stage1.optim.lr == 1e-3 and config.mining.fn_ratio == 0.95
    with pytest.raises(ConfigError, match="stage1.optim.lr: expected a number, got 'fast'"):
        load_config(DEMO, ["stage1.optim.lr=fast"])


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
    """A declared but ignored knob is a lie to the user.

    A field counts as read when pipeline code reads ``<section>.<field>`` (or
    ``config.<field>`` / ``self.<field>`` at the top level), or hands its whole section
    over with ``asdict(...<section>)`` to code that takes ``<field>`` by name, or hands it to
    an actor-pool helper as ``(config.<section>, "<section>"`` that reads ``pool.<field>``.
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
                and re.search(rf"\b{leaf}\b\s*[:=]", callees)) or (
                re.search(rf"\(config\.{section}, \"{section}\"", sources)
                and re.search(rf"\bpool\.{leaf}\b", callees))
        if not read:
            unread.append(key)
    assert not unread, f"config fields never read in pipeline/: {unread}"


def test_stages_share_the_optim_and_lora_sections_with_their_own_defaults():
    config = load_config(None, ["stage2.lora.rank=4"])
    assert type(config.stage1.optim) is type(config.stage2.optim)
    assert type(config.stage1.lora) is type(config.stage2.lora)
    assert (config.stage1.lora.rank, config.stage1.lora.alpha, config.stage1.optim.lr) == \
        (32, 64, 5e-4)
    # a partly given section keeps the rest of its stage's defaults, not the class's
    assert (config.stage2.lora.rank, config.stage2.lora.alpha, config.stage2.optim.lr) == \
        (4, 32, 1e-4)


def test_old_flat_keys_move_to_the_shared_sections(caplog):
    config = load_config(None, ["stage1.lr=2e-4", "stage2.lora_rank=4"])
    assert config.stage1.optim.lr == 2e-4 and config.stage2.lora.rank == 4
    assert "stage1.lr is now stage1.optim.lr" in caplog.text
    with pytest.raises(ConfigError, match="both stage2.lr and stage2.optim.lr are set"):
        load_config(None, ["stage2.lr=1e-4", "stage2.optim.lr=2e-4"])


@pytest.mark.parametrize("overrides, message", [
    (["mining.search_k=2", "mining.num_negatives=8"],
     "mining.search_k=2 is below mining.num_negatives=8"),
    (["mining.selection=range", "mining.range_min=5", "mining.range_max=5"],
     "mining.range_max=5 must exceed mining.range_min=5"),
    (["mining.index=ivf", "mining.backend=torch"], "mining.index=ivf needs a faiss"),
    (["mining.index=ivf", "mining.ivf_nlist=4", "mining.ivf_nprobe=8"],
     "mining.ivf_nprobe=8 is more than mining.ivf_nlist=4"),
    (["mining.fn_ratio=0"], "mining.fn_ratio=0.0 must be > 0"),
    (["stage2.fn_ratio=-1"], "stage2.fn_ratio=-1.0 must be > 0"),
    (["train.num_workers=3"], "stage1.global_batch_groups=256 is not a multiple of "
                              "train.num_workers=3"),
    (["train.num_workers=3", "stage1.global_batch_groups=3"],
     "stage2.global_batch_pairs=1024 is not a multiple of train.num_workers=3"),
    (["train.grad_cache_chunk_size=4", "train.zero_stage=0"],
     "train.grad_cache_reduce_once needs train.zero_stage >= 1"),
    (["train.precision=bf16", "train.use_gpu=false"], "train.precision=bf16 needs GPUs"),
    (["stage2.mined_negatives=0", "stage2.given_negatives=0"],
     "stage2.negatives=both needs stage2.mined_negatives or stage2.given_negatives > 0"),
    (["stage2.mined_negatives=9"], "stage2.mined_negatives=9 is more than the "
                                   "mining.num_negatives=8"),
    (["stage2.init="], "stage2.init is empty"),
    (["export.source="], "export.source is empty"),
    (["eval.retrieval_ks=[]"], r"eval.retrieval_ks: need K >= 1"),
])
def test_cross_field_rules_name_both_keys(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message) if "\\" not in message else message):
        load_config(None, overrides)


def test_literal_booleans_are_not_numbers():
    assert load_config(None, ["ray.progress_bars=false"]).ray.progress_bars is False
    assert load_config(None, []).ray.progress_bars == "auto"
    with pytest.raises(ConfigError, match="ray.progress_bars: 0 is not allowed"):
        load_config(None, ["ray.progress_bars=0"])


def test_knob_listing_shows_every_field_with_value_bounds_and_help():
    from pipeline.config import describe_knobs

    config = load_config(DEMO)
    text = describe_knobs(config)
    keys = [line.split(" = ")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert keys == [key for key, _ in iter_fields()]
    lines = text.splitlines()
    row = lines[keys.index("stage2.lora.rank") * 2]
    assert row == "stage2.lora.rank = 8  (int min 1)"
    assert "LoRA rank" in lines[keys.index("stage2.lora.rank") * 2 + 1]
    assert "[runtime: not hashed]" in lines[keys.index("ray.num_cpus") * 2]
    assert "[runtime" not in lines[keys.index("eval.prompt_mode") * 2]   # its step hashes it


def test_eval_and_export_settings_do_not_move_the_run_folder():
    a = load_config(DEMO)
    b = load_config(DEMO, ["eval.prompt_mode=raw", "export.dtype=bfloat16"])
    assert a.config_hash == b.config_hash


# -- non-finite numbers, model locations ----------------------------------------------------------
def float_keys() -> list[str]:
    """Every knob typed float or float | None."""
    import typing

    from pipeline.config import _owner_class

    keys = []
    for key, _field in iter_fields():
        hint = typing.get_type_hints(_owner_class(key))[key.rsplit(".", 1)[-1]]
        if hint is float or float in typing.get_args(hint):
            keys.append(key)
    return keys


def test_float_knobs_are_found():
    keys = float_keys()
    assert {"stage2.fn_margin", "mining.fn_ratio", "stage1.optim.lr", "ray.resource_wait_s",
            "ray.start_timeout_s"} <= set(keys)
    assert "data.image_size" not in keys and len(keys) >= 20


@pytest.mark.parametrize("text, shown", [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"),
                                         (".nan", "nan"), (".inf", "inf"), ("NaN", "nan"),
                                         ("Infinity", "inf")])
@pytest.mark.reliability
def test_every_float_knob_refuses_non_finite_overrides(text, shown):
    for key in float_keys():
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"{key}={text}"])
        assert str(info.value) == f"{key}={shown}: not a finite number"


@pytest.mark.reliability
def test_non_finite_numbers_in_yaml_are_refused(tmp_path):
    for section, key, value, shown in (("stage2", "fn_margin", ".nan", "nan"),
                                       ("ray", "resource_wait_s", ".inf", "inf"),
                                       ("mining", "max_score", "-.inf", "-inf")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"{section}:\n  {key}: {value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert str(info.value) == f"{section}.{key}={shown}: not a finite number"
    path = tmp_path / "lr.yaml"
    path.write_text("stage1:\n  optim:\n    lr: .inf\n")
    with pytest.raises(ConfigError, match=r"^stage1\.optim\.lr=inf: not a finite number$"):
        load_config(str(path))


def test_no_knob_defaults_to_a_non_finite_number():
    import math

    config = Config()
    for key in float_keys():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        assert value is None or math.isfinite(value), key


def test_finite_floats_and_null_still_pass():
    config = load_config(None, ["stage2.fn_margin=null", "mining.fn_ratio=0.9",
                                "ray.start_timeout_s=300"])
    assert config.stage2.fn_margin is None and config.mining.fn_ratio == 0.9
    assert config.ray.start_timeout_s == 300.0 and Config().ray.start_timeout_s == 120.0
    with pytest.raises(ConfigError, match=r"ray.start_timeout_s: 0.0 is below the minimum 1.0"):
        load_config(None, ["ray.start_timeout_s=0"])


@pytest.mark.parametrize("override, message", [
    ("model.path=tiny:gpt2", "model.path=tiny:gpt2: unknown family 'gpt2'; tiny:<family> takes "
                             "one of llava_next, qwen2_vl, qwen2_5_vl, phi3_v"),
    ("model.path='tiny:'", "model.path=tiny:: unknown family ''; tiny:<family> takes one of "
                         "llava_next, qwen2_vl, qwen2_5_vl, phi3_v"),
    ("model.path=s3://", "model.path=s3://: an s3:// URI needs a bucket: s3://BUCKET/prefix"),
    ("model.path=s3:///models/x", "model.path=s3:///models/x: an s3:// URI needs a bucket"),
    ("model.path=gs://b/m", "model.path=gs://b/m: unsupported URI scheme 'gs' (use a local "
                            "folder or s3://BUCKET/prefix)"),
    ("mining.miner=s3://", "mining.miner=s3://: an s3:// URI needs a bucket"),
    ("eval.models=[stage1, 'x=s3://']", "eval.models entry 'x=s3://': an s3:// URI needs a "
                                        "bucket"),
    ("eval.models=['s3:///m']", "eval.models entry 's3:///m': an s3:// URI needs a bucket"),
])
@pytest.mark.reliability
def test_model_locations_of_a_form_nothing_loads_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [override])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("override", [
    "model.path=tiny:qwen2_vl", "model.path=s3://bucket/models/qwen", "model.path=/not/yet/made",
    "model.path=relative/folder", "model.path=file:///opt/m", "mining.miner=s3://b/miner",
    "mining.miner=stage1", "eval.models=[base=student, stage1, 'x=s3://b/x', 'y=/m/y']",
])
def test_well_formed_model_locations_load(override):
    # A local folder's existence is checked before Ray starts, not here (tests create it later).
    key, value = override.split("=", 1)
    config = load_config(DEMO, [override])
    assert config.model.path == (value if key == "model.path" else "tiny:llava_next")
