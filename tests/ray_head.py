"""A real Ray head on loopback for the job-submission tests: ``ray start --head`` with the
dashboard (the Jobs API server) on 127.0.0.1, started from this venv so that a job's
``python`` is this venv's (jobs resolve ``python`` from the raylet's PATH), stopped by
``ray stop --force`` at the end."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.ray_utils import LOCAL_ENV

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# The environment jobs give a local Ray (127.0.0.1, no usage stats), without token auth.
HEAD_ENV = {**LOCAL_ENV, "RAY_AUTH_MODE": "disabled"}


def head_env() -> dict[str, str]:
    """The environment ``ray start`` and the ``ray`` CLI run with: this venv first on PATH."""
    return {**os.environ, **HEAD_ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_ray() -> None:
    subprocess.run([RAY, "stop", "--force"], env=head_env(), capture_output=True, timeout=120)


@contextmanager
def ray_head(num_cpus: int = 4, object_store_mb: int = 768) -> Iterator[str]:
    """Start a head; yield its Jobs API address (``http://127.0.0.1:<port>``)."""
    gcs_port, dashboard_port = free_port(), free_port()
    stop_ray()
    subprocess.run([RAY, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}",
                    f"--object-store-memory={object_store_mb * 1024 * 1024}",
                    "--disable-usage-stats"],
                   env=head_env(), check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_jobs_api(address)
        yield address
    finally:
        stop_ray()


def wait_for_jobs_api(address: str, timeout_s: float = 120.0) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # the dashboard is still starting  # noqa: BLE001
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def autoscaling_cluster(head_cpus: int, worker_types: dict[str, dict]) -> object:
    """Ray's fake autoscaling cluster (``ray.cluster_utils.AutoscalingCluster``: the real
    autoscaler, with a node provider that starts raylets on this machine); worker types in
    the cluster launcher's ``available_node_types`` form. The ``GPU`` of a fake node is a
    resource label: no device behind it.

    Ray's wheel lacks the example config that ``AutoscalingCluster`` starts from, so the
    launcher config is written out here.
    """
    from ray.cluster_utils import AutoscalingCluster

    class _Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources: dict, worker_node_types: dict,
                             autoscaler_v2: bool = False, **config_kwargs: object) -> dict:
            node_types = {**worker_node_types, "ray.head.default": {
                "resources": dict(head_resources), "node_config": {}, "max_workers": 0}}
            return {"cluster_name": "fake-autoscaling", "max_workers": 4,
                    "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
                    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                                 "disable_node_updaters": True,
                                 "disable_launch_config_check": True},
                    "available_node_types": node_types, "head_node_type": "ray.head.default",
                    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
                    "file_mounts_sync_continuously": False, "rsync_exclude": [],
                    "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
                    "head_setup_commands": [], "worker_setup_commands": [],
                    "head_start_ray_commands": [], "worker_start_ray_commands": [],
                    **config_kwargs}

    os.environ.update(HEAD_ENV)
    # `ray start` (called by the cluster) must be this venv's.
    os.environ["PATH"] = head_env()["PATH"]
    return _Cluster(head_resources={"CPU": head_cpus}, worker_node_types=worker_types)
