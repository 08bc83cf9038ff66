"""pipeline.download_cache: one download per node of an s3:// folder."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pipeline import download_cache, storage

pytestmark = pytest.mark.usefixtures("storage_env")


# -- download cache ------------------------------------------------------------------------------
@pytest.mark.cluster
def test_download_to_cache_downloads_once(s3_bucket: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = storage.join(s3_bucket, "models", "tiny")
    files = {"config.json": b"{}", "sub/weights.bin": os.urandom(1000)}
    for rel, data in files.items():
        storage.write_bytes(storage.join(model, rel), data)
    calls: list[str] = []
    download = download_cache._download_prefix
    monkeypatch.setattr(download_cache, "_download_prefix",
                        lambda uri, dest: (calls.append(uri), download(uri, dest))[1])
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        download_cache.download_to_cache(model, str(tmp_path)))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    local = str(tmp_path / s3_bucket[len("s3://"):] / "models" / "tiny")
    assert results == [local] * 3 and len(calls) == 1
    for rel, data in files.items():
        assert (Path(local) / rel).read_bytes() == data
    storage.delete_prefix(model)  # a second call must not need S3
    assert download_cache.download_to_cache(model, str(tmp_path)) == local
    assert (Path(local) / "config.json").read_bytes() == b"{}" and len(calls) == 1
    with pytest.raises(FileNotFoundError, match="no objects"):
        download_cache.download_to_cache(storage.join(s3_bucket, "models", "absent"), str(tmp_path))

def test_download_to_cache_keeps_local_paths(tmp_path: Path) -> None:
    assert download_cache.download_to_cache(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        download_cache.download_to_cache(str(tmp_path / "missing"))
