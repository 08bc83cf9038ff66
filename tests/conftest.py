"""Shared test setup: offline Hugging Face, Ray on loopback, no usage stats."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# -- S3 on loopback (tests/s3_server.py) ---------------------------------------------------------
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

# Fake credentials the loopback server accepts; distinctive, so that a scan of every output
# file and log can tell they were never written (tests/test_prepare.py).
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAUNIMEFAKEKEY0001",
    "AWS_SECRET_ACCESS_KEY": "unime-fake-secret-never-written-0001",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server for the session; the env points storage (and boto3) at it."""
    from pipeline import storage
    from tests.s3_server import LocalS3Server

    server = LocalS3Server()
    url = server.start()
    env = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_REGION"]}
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.pop("AWS_REGION", None)
    os.environ.update(env)
    storage.reset_filesystems()
    try:
        yield url
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage.reset_filesystems()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the test endpoint: ``s3://<name>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=name)
    return f"s3://{name}"


# -- Ray on loopback -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """A local Ray instance, started the way jobs start it, shared by the tests that run one
    after the other (module scope, so module fixtures can use it; started again after a
    test that needed Ray to itself: see ``no_local_ray``).

    It depends on ``s3_endpoint`` so that workers inherit the S3 test endpoint.
    """
    import ray

    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.ray_utils import init_ray

    if not ray.is_initialized():
        storage.configure()
        init_ray(load_config(None, ["ray.num_cpus=4", "ray.object_store_memory_mb=512",
                                    "ray.progress_bars=false"]))
    yield


@pytest.fixture
def no_local_ray() -> Iterator[None]:
    """For tests that start Ray their own way (a head with the Jobs API, several nodes): the
    shared local instance is shut down first (two instances on two cores starve each other);
    the next test that needs it starts it again."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


# -- storage folders -----------------------------------------------------------------------------
@pytest.fixture
def storage_env() -> Iterator[None]:
    """Storage on env-only settings for the test (and after it)."""
    from pipeline import storage

    storage.configure()
    yield
    storage.configure()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.cluster)])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A folder URI that does not exist yet: local (tmp_path) or on a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"
