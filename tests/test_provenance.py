"""pipeline.provenance: input fingerprints and the code version."""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import outputs, provenance, storage

TABLE = pa.table({"id": list(range(50)), "text": [f"row {i}" for i in range(50)]})
MANIFEST = {"rows_in": 10, "rows_out": 8, "rows_rejected": 2, "config_hash": "abc",
            "seconds": 1.5}

pytestmark = pytest.mark.usefixtures("storage_env")


# -- fingerprints ------------------------------------------------------------------------------
def test_fingerprint_tracks_content(root: str) -> None:
    storage.write_bytes(storage.join(root, "a.txt"), b"aaaa")
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"bb")
    first = provenance.fingerprint(root)
    assert first == provenance.fingerprint(root)
    assert (first["uri"], first["files"], first["bytes"]) == (root, 2, 6)
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"bc")  # same size, new content
    changed = provenance.fingerprint(root)
    assert changed["sha256"] != first["sha256"]
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"bb")
    assert provenance.fingerprint(root) == first
    one = provenance.fingerprint(storage.join(root, "a.txt"))
    assert one["files"] == 1 and one["bytes"] == 4
    storage.write_bytes(storage.join(root, "a.txt"), b"aaab")
    assert provenance.fingerprint(storage.join(root, "a.txt"))["sha256"] != one["sha256"]
    with pytest.raises(FileNotFoundError):
        provenance.fingerprint(storage.join(root, "missing"))

def test_fingerprint_of_complete_output_uses_config_hash(root: str) -> None:
    storage.write_table(TABLE, storage.join(root, outputs.shard_name(0)))
    outputs.write_manifest(root, {**MANIFEST, "seconds": 1.0})
    first = provenance.fingerprint(root)
    outputs.write_manifest(root, {**MANIFEST, "seconds": 2.0, "written_at": "later"})
    assert provenance.fingerprint(root) == first  # a rerun of the same config
    outputs.write_manifest(root, {**MANIFEST, "config_hash": "other"})
    assert provenance.fingerprint(root)["sha256"] != first["sha256"]

def test_fingerprint_of_large_file_uses_size_and_mtime(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "HASH_CONTENT_MAX_BYTES", 3)
    path = tmp_path / "big.bin"
    path.write_bytes(b"abcd")
    os.utime(path, ns=(10**18, 10**18))
    first = provenance.fingerprint(str(path))
    path.write_bytes(b"abce")
    os.utime(path, ns=(10**18, 10**18))
    assert provenance.fingerprint(str(path)) == first  # content is not read above the limit
    os.utime(path, ns=(10**18 + 1, 10**18 + 1))
    assert provenance.fingerprint(str(path))["sha256"] != first["sha256"]


# -- code version --------------------------------------------------------------------------------
def _git_repo(path: Path) -> str:
    """A git repo at ``path`` with one committed source file; returns the commit."""
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (path / "pipeline").mkdir()
    (path / "pipeline" / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "pipeline/f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_git_version_of_checkout(tmp_path: Path) -> None:
    commit = _git_repo(tmp_path)
    assert provenance.git_version(str(tmp_path)) == commit
    (tmp_path / "untracked.py").write_text("b = 1\n")
    assert provenance.git_version(str(tmp_path)) == commit  # untracked files are not dirty
    (tmp_path / "pipeline" / "f.py").write_text("a = 2\n")
    assert provenance.git_version(str(tmp_path)) == commit + "-dirty"
    assert provenance.git_version(str(tmp_path / "pipeline")) is None  # not the top of the repo
    assert provenance.git_version(str(tmp_path / "missing")) is None


def test_code_version_bases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = _git_repo(tmp_path)
    digest = provenance.source_hash(str(tmp_path))[:12]
    monkeypatch.setenv(provenance.CODE_COMMIT_ENV, "feedbeef-dirty")
    assert provenance.describe_code(str(tmp_path)) == f"{commit}+src.{digest}"  # git first
    shutil.rmtree(tmp_path / ".git")  # what `ray job submit --working-dir` uploads
    assert provenance.describe_code(str(tmp_path)) == f"feedbeef-dirty+src.{digest}"
    monkeypatch.delenv(provenance.CODE_COMMIT_ENV)
    installed = importlib.metadata.version("unime-pipeline")
    assert provenance.describe_code(str(tmp_path)) == f"unime-pipeline=={installed}+src.{digest}"
    monkeypatch.setattr(provenance, "git_version", lambda repo: None)
    monkeypatch.chdir(tmp_path)  # the tree the code was imported from, not the cwd
    source = provenance.source_hash(provenance.SOURCE_ROOT)[:12]
    assert provenance.code_version.__wrapped__() == f"unime-pipeline=={installed}+src.{source}"

    def unreadable(root: str) -> str:
        raise PermissionError(f"{root}/pipeline/f.py")

    monkeypatch.setattr(provenance, "source_hash", unreadable)
    assert provenance.describe_code(str(tmp_path)) == f"unime-pipeline=={installed}+src.unknown"


def test_source_hash_covers_the_sources_that_run(tmp_path: Path) -> None:
    sources = ["pipeline/__init__.py", "pipeline/steps/stage2.py", "jobs/stage2.py",
               "jobs/configs/demo.yaml", "jobs/configs/sub/x.yaml"]
    others = ["README.md", "tests/test_x.py", "pipeline/notes.txt", "jobs/other.yaml",
              "pipeline/__pycache__/stage2.cpython-311.pyc", "cluster/runtime_env.yaml"]
    for rel in sources + others:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x = 1\n")
    first = provenance.source_hash(str(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    for rel in others:
        (tmp_path / rel).write_bytes(b"x = 2\n")
    assert provenance.source_hash(str(tmp_path)) == first
    for rel in sources:
        (tmp_path / rel).write_bytes(b"x = 2\n")  # one byte
        assert provenance.source_hash(str(tmp_path)) != first, rel
        (tmp_path / rel).write_bytes(b"x = 1\n")
    assert provenance.source_hash(str(tmp_path)) == first
    (tmp_path / "jobs" / "stage2.py").rename(tmp_path / "jobs" / "stage3.py")
    assert provenance.source_hash(str(tmp_path)) != first  # the paths count too
    (tmp_path / "pipeline" / "new.py").write_text("")
    assert provenance.describe_code(str(tmp_path)).endswith(
        "+src." + provenance.source_hash(str(tmp_path))[:12])
