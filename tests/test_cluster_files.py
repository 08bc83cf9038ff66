"""Cluster files: the KubeRay manifests (cluster/kuberay/), ray_cluster.yaml (AWS cluster
launcher), the image (cluster/Dockerfile) and its build context (.dockerignore).

Plain parsing plus Ray's own pure config functions (the KubeRay autoscaler's reading of a
RayCluster, the AWS node provider's filling of node resources with EC2's answer stubbed):
no Ray started, no Kubernetes or AWS needed."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
RAY_CLUSTER_YAML = REPO / "ray_cluster.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
SERVICE_ACCOUNT = "unime-ray"
RAY_KINDS = {"RayCluster", "RayJob"}


# -- helpers ------------------------------------------------------------------------------------
def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document in cluster/kuberay/*.yaml."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                found.append((path.name, doc))
    return found


def of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in manifests() if doc.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the RayClusters' and the RayJobs' rayClusterSpec."""
    specs = [(f"{name}:{doc['metadata']['name']}", doc["spec"])
             for name, doc in of_kind("RayCluster")]
    specs += [(f"{name}:{doc['metadata']['name']}.rayClusterSpec", doc["spec"]["rayClusterSpec"])
              for name, doc in of_kind("RayJob") if "rayClusterSpec" in doc["spec"]]
    return specs


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head group and every worker group."""
    return [("head", spec["headGroupSpec"]),
            *((g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", []))]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the first container of the pod template."""
    return group["template"]["spec"]["containers"][0]


def gpu_groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in spec.get("workerGroupSpecs", [])
            if "nvidia.com/gpu" in ray_container(g).get("resources", {}).get("limits", {})]


def custom_resources(ray_start_params: dict[str, str]) -> dict[str, Any]:
    """rayStartParams.resources as both readers see it; they must agree.

    The Ray autoscaler (ray/autoscaler/_private/kuberay/autoscaling_config.py,
    _get_custom_resources) drops the first and last character and every backslash; the
    KubeRay operator (ray-operator/controllers/ray/common/pod.go, getResourcesMap) trims
    quotes and spaces and parses JSON."""
    text = ray_start_params.get("resources")
    if text is None:
        return {}
    by_ray = json.loads(text[1:-1].replace("\\", ""))
    by_operator = json.loads(text.strip("'\"` "))
    assert by_ray == by_operator, f"rayStartParams.resources {text!r} is read two ways"
    return by_ray


def entrypoint_argv(job: dict[str, Any]) -> list[str]:
    return shlex.split(job["spec"]["entrypoint"])


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing in {argv}"
    return argv[argv.index(name) + 1]


def overrides(argv: list[str]) -> list[str]:
    return [a for a in argv[2:] if "=" in a and not a.startswith("-")]


def spec_problems(spec: dict[str, Any]) -> list[str]:
    """What KubeRay's ray.io/v1 RayCluster spec needs and what this pipeline relies on."""
    problems = []
    if not spec.get("rayVersion"):
        problems.append("no rayVersion")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    if "idleTimeoutSeconds" not in spec.get("autoscalerOptions", {}):
        problems.append("no autoscalerOptions.idleTimeoutSeconds")
    if "headGroupSpec" not in spec:
        return [*problems, "no headGroupSpec"]
    workers = spec.get("workerGroupSpecs") or []
    if not workers:
        problems.append("no workerGroupSpecs")
    names = [g.get("groupName") for g in workers]
    if len(set(names)) != len(names):
        problems.append(f"groupName repeated: {names}")
    for name, group in groups(spec):
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{name}: rayStartParams missing (KubeRay requires the field)")
        containers = group.get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            problems.append(f"{name}: no template.spec.containers")
            continue
        if not containers[0].get("image"):
            problems.append(f"{name}: containers[0] has no image")
        resources = containers[0].get("resources", {})
        if not resources.get("limits") or not resources.get("requests"):
            problems.append(f"{name}: containers[0] needs resources.limits and requests")
        if name == "head":
            continue
        if not name or name == "?":
            problems.append("a worker group without groupName")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not isinstance(low, int) or not isinstance(high, int):
            problems.append(f"{name}: minReplicas and maxReplicas must be integers")
            continue
        replicas = group.get("replicas", low)
        if not low <= replicas <= high:
            problems.append(f"{name}: needs minReplicas <= replicas <= maxReplicas, got "
                            f"{low} <= {replicas} <= {high}")
    if not gpu_groups(spec):
        problems.append("no worker group with nvidia.com/gpu in its limits")
    return problems


# -- KubeRay manifests --------------------------------------------------------------------------
def test_kuberay_files_hold_ray_io_v1_clusters_and_jobs():
    docs = manifests()
    assert docs, "no cluster/kuberay/*.yaml"
    for name, doc in docs:
        if doc.get("kind") == "ServiceAccount":
            assert doc.get("apiVersion") == "v1", name
            continue
        assert doc.get("kind") in RAY_KINDS, f"{name}: unexpected kind {doc.get('kind')!r}"
        assert doc.get("apiVersion") == "ray.io/v1", f"{name}: apiVersion must be ray.io/v1"
        assert doc.get("metadata", {}).get("name"), f"{name}: no metadata.name"
        assert isinstance(doc.get("spec"), dict), f"{name}: no spec"
    jobs = [doc for _, doc in of_kind("RayJob")]
    assert of_kind("RayCluster"), "no RayCluster"
    assert any("clusterSelector" in job["spec"] for job in jobs), "no RayJob on the RayCluster"
    assert any("rayClusterSpec" in job["spec"] for job in jobs), "no self-contained RayJob"


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_cluster_spec_is_complete(where, spec):
    assert spec_problems(spec) == [], where


def test_cluster_spec_check_catches_broken_specs():
    _, spec = cluster_specs()[0]
    broken = json.loads(json.dumps(spec))
    broken["workerGroupSpecs"][0]["replicas"] = broken["workerGroupSpecs"][0]["maxReplicas"] + 1
    del broken["headGroupSpec"]["rayStartParams"]
    for group in gpu_groups(broken):
        del ray_container(group)["resources"]["limits"]["nvidia.com/gpu"]
    problems = spec_problems(broken)
    assert any("replicas" in p for p in problems)
    assert any("head: rayStartParams" in p for p in problems)
    assert any("nvidia.com/gpu" in p for p in problems)


def test_ray_version_matches_the_image_and_the_venv():
    import ray

    tag = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)", DOCKERFILE.read_text(), re.M)
    assert tag, "cluster/Dockerfile: FROM rayproject/ray:<version>-... expected"
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == tag.group(1) == ray.__version__, where


def test_head_runs_no_work_and_its_dashboard_is_not_exposed():
    for where, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", where
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: port-forward only"
        assert head.get("enableIngress", False) is False, f"{where}: port-forward only"
        ports = {p.get("containerPort") for p in ray_container(head).get("ports", [])}
        assert 8265 in ports, f"{where}: the dashboard port (job submission) must be declared"


def test_gpu_groups_stay_in_one_zone_and_name_their_accelerator():
    for where, spec in cluster_specs():
        zones = {g["template"]["spec"].get("nodeSelector", {}).get("topology.kubernetes.io/zone")
                 for g in gpu_groups(spec)}
        assert len(zones) == 1 and None not in zones, f"{where}: GPU groups in one zone: {zones}"
        for group in gpu_groups(spec):
            limits = ray_container(group)["resources"]["limits"]
            requests = ray_container(group)["resources"]["requests"]
            assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"], where
            kinds = [k for k in custom_resources(group["rayStartParams"])
                     if k.startswith("accelerator_type:")]
            assert len(kinds) == 1, f"{where}/{group['groupName']}: one accelerator_type:<kind>"


def test_ray_autoscaler_sees_the_groups_resources():
    # The KubeRay autoscaler's own reading of the RayCluster (what it scales from zero on).
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    for where, spec in cluster_specs():
        config = _derive_autoscaling_config_from_ray_cr(
            {"metadata": {"name": "unime", "namespace": "default"}, "spec": spec})
        types = config["available_node_types"]
        assert types["headgroup"]["resources"]["CPU"] == 0, where
        gpu_types = [t["resources"] for t in types.values() if t["resources"].get("GPU")]
        assert any(r["GPU"] == 8 and r.get("accelerator_type:A100") == 1 for r in gpu_types), (
            f"{where}: no group the autoscaler sees as 8 GPUs + accelerator_type:A100: {types}")


def test_rayjob_runs_a_job_script_with_a_config_that_loads():
    for name, job in of_kind("RayJob"):
        argv = entrypoint_argv(job)
        assert argv[0] == "python", f"{name}: entrypoint must start with python"
        script = argv[1]
        assert script.startswith("jobs/") and (REPO / script).is_file(), f"{name}: {script}"
        config_path = option(argv, "--config")
        assert config_path.startswith("jobs/configs/") and (REPO / config_path).is_file(), (
            f"{name}: {config_path}")
        config = load_config(str(REPO / config_path), overrides(argv))  # ConfigError if bad
        assert config.output_root.startswith("s3://"), f"{name}: output_root must be s3://"


def test_rayjob_has_one_cluster_source():
    cluster_names = {doc["metadata"]["name"] for _, doc in of_kind("RayCluster")}
    for name, job in of_kind("RayJob"):
        spec = job["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
            f"{name}: exactly one of rayClusterSpec or clusterSelector")
        if "clusterSelector" in spec:
            assert set(spec["clusterSelector"]) == {"ray.io/cluster"}, name
            assert spec["clusterSelector"]["ray.io/cluster"] in cluster_names, (
                f"{name}: clusterSelector names no RayCluster of cluster/kuberay/")
            assert not spec.get("shutdownAfterJobFinishes"), f"{name}: the cluster is shared"
        else:
            assert spec.get("shutdownAfterJobFinishes") is True, name
            assert isinstance(spec.get("ttlSecondsAfterFinished"), int), name
            assert spec["ttlSecondsAfterFinished"] >= 0, name
            assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 0, name


def test_self_contained_rayjob_uses_the_rayclusters_spec():
    (_, cluster), = of_kind("RayCluster")
    for name, job in of_kind("RayJob"):
        if "rayClusterSpec" in job["spec"]:
            assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
                f"{name}: rayClusterSpec differs from raycluster.yaml's spec")


def test_rayjob_runtime_env_matches_cluster_runtime_env():
    wanted = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["env_vars"]
    for name, job in of_kind("RayJob"):
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML", "")) or {}
        assert runtime_env.get("env_vars") == wanted, name
        assert "working_dir" not in runtime_env, f"{name}: the code is in the image"


def test_every_pod_runs_as_the_irsa_service_account():
    pods = [(where, name, group["template"]["spec"])
            for where, spec in cluster_specs() for name, group in groups(spec)]
    assert pods
    for where, name, pod in pods:
        assert pod.get("serviceAccountName") == SERVICE_ACCOUNT, f"{where}/{name}"
    (_, account), = of_kind("ServiceAccount")
    assert account["metadata"]["name"] == SERVICE_ACCOUNT
    role = account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
    assert re.fullmatch(r"arn:aws:iam::(ACCOUNT_ID|\d{12}):role/[\w+=,.@-]+", role), role


def test_ray_containers_run_the_pipeline_image_in_its_workdir():
    dockerfile = DOCKERFILE.read_text()
    image = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile).group(1)
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    for where, spec in cluster_specs():
        for name, group in groups(spec):
            container = ray_container(group)
            assert container["image"] == image, f"{where}/{name}"
            assert container.get("workingDir", workdir) == workdir, f"{where}/{name}"
    assert yaml.safe_load(RAY_CLUSTER_YAML.read_text())["docker"]["image"] == image


def test_no_credentials_in_cluster_files():
    secret = re.compile(r"AWS_SECRET_ACCESS_KEY|aws_secret|AKIA[0-9A-Z]{16}", re.I)
    files = [p for p in (REPO / "cluster").rglob("*") if p.is_file()] + [RAY_CLUSTER_YAML]
    assert len(files) > 3
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not secret.search(text), f"{path.relative_to(REPO)}: {secret.search(text)[0]}"


def test_kuberay_readme_commands_match_the_files():
    readme = (KUBERAY / "README.md").read_text()
    names = {(doc["kind"].lower(), doc["metadata"]["name"]) for _, doc in manifests()}
    paths = re.findall(r"-f (cluster/[\w/.-]*\w)", readme)
    assert paths, "no `kubectl apply -f` in cluster/kuberay/README.md"
    for path in paths:
        assert (REPO / path).exists(), path
    for kind, name in re.findall(r"kubectl (?:get|describe) (rayjob|raycluster) ([\w-]+)", readme):
        assert (kind, name) in names, f"{kind} {name}"
    for name in re.findall(r"job-name=([\w-]+)", readme):
        assert ("rayjob", name) in names, name
    (_, cluster), = of_kind("RayCluster")
    for svc in re.findall(r"svc/([\w-]+-head-svc)\b", readme):
        assert svc == f"{cluster['metadata']['name']}-head-svc", svc
    image = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", readme).group(1)
    assert image == ray_container(cluster["spec"]["headGroupSpec"])["image"]


# -- ray_cluster.yaml (AWS cluster launcher) ----------------------------------------------------
def test_ray_cluster_yaml_dashboard_workers_and_zone():
    config = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    workers = {name: node for name, node in config["available_node_types"].items()
               if name != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["max_workers"] <= config["max_workers"], name
        assert node["min_workers"] <= node["max_workers"], name
    zones = [z.strip() for z in str(config["provider"]["availability_zone"]).split(",")]
    assert len(zones) == 1 and zones[0], f"one availability zone, got {zones}"
    assert zones[0].startswith(config["provider"]["region"]), zones


def test_ray_cluster_yaml_gpu_types_get_their_accelerator_type(monkeypatch):
    # `ray up` fills node resources from EC2's DescribeInstanceTypes (stubbed here with what
    # EC2 answers for these types): the A100 and H100 types must come out distinct.
    from ray.autoscaler._private.aws import node_provider

    ec2 = {
        "m6i.4xlarge": {"VCpuInfo": {"DefaultVCpus": 16}, "MemoryInfo": {"SizeInMiB": 65536}},
        "m6i.8xlarge": {"VCpuInfo": {"DefaultVCpus": 32}, "MemoryInfo": {"SizeInMiB": 131072}},
        "p4d.24xlarge": {"VCpuInfo": {"DefaultVCpus": 96}, "MemoryInfo": {"SizeInMiB": 1179648},
                         "GpuInfo": {"Gpus": [{"Name": "A100", "Manufacturer": "NVIDIA",
                                               "Count": 8}]}},
        "p4de.24xlarge": {"VCpuInfo": {"DefaultVCpus": 96},
                          "MemoryInfo": {"SizeInMiB": 1179648},
                          "GpuInfo": {"Gpus": [{"Name": "A100", "Manufacturer": "NVIDIA",
                                                "Count": 8}]}},
        "p5.48xlarge": {"VCpuInfo": {"DefaultVCpus": 192}, "MemoryInfo": {"SizeInMiB": 2097152},
                        "GpuInfo": {"Gpus": [{"Name": "H100", "Manufacturer": "NVIDIA",
                                              "Count": 8}]}},
    }
    monkeypatch.setattr(node_provider, "list_ec2_instances", lambda region, credentials=None: [
        {"InstanceType": name, **info} for name, info in ec2.items()])
    config = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    filled = node_provider.AWSNodeProvider.fillout_available_node_types_resources(config)
    resources = {name: node["resources"] for name, node in filled["available_node_types"].items()}
    assert resources["worker.a100"].get("accelerator_type:A100") == 1, resources
    assert resources["worker.h100"].get("accelerator_type:H100") == 1, resources
    assert "accelerator_type:H100" not in resources["worker.a100"], resources
    assert resources["worker.a100"]["GPU"] == resources["worker.h100"]["GPU"] == 8, resources
    assert resources[config["head_node_type"]]["CPU"] == 0, resources


# -- the image and its build context ------------------------------------------------------------
def test_dockerignore_keeps_the_venv_and_git_out():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = {line.strip().strip("/") for line in lines
                if line.strip() and not line.startswith("#")}
    for needed in (".venv", ".git", "runs"):
        assert needed in patterns, f".dockerignore must exclude {needed}/"
    assert not any(p.startswith("!") for p in patterns), "no re-included paths"


def test_dockerfile_copies_the_code_the_jobs_run():
    text = DOCKERFILE.read_text()
    copied = {m.group(1).strip("./") for m in
              re.finditer(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M)}
    for needed in ("pipeline", "jobs", "requirements"):
        assert needed in copied, f"cluster/Dockerfile must COPY {needed}"
    assert re.search(r'-e "\.\[gpu\]"', text), "faiss-gpu via .[gpu]"
