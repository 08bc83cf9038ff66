"""pipeline.provenance: input fingerprints and the code version."""
from __future__ import annotations

import os
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
def test_code_version_of_git_checkout_and_fallback(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    assert provenance._git_version(str(tmp_path)) == commit
    (tmp_path / "f.py").write_text("a = 2\n")
    assert provenance._git_version(str(tmp_path)) == commit + "-dirty"
    (tmp_path / "sub").mkdir()
    assert provenance._git_version(str(tmp_path / "sub")) is None  # not the top of the repo
    monkeypatch.setattr(provenance, "_git_version", lambda repo: None)
    assert provenance.code_version.__wrapped__() == "unime-pipeline==0.1.0"
