"""Deployment files stay true to the code: every manifest parses, names entrypoints, configs and import
paths that exist, asks for GPUs the way KubeRay and the cluster launcher expect, and the RayService's
Serve config is the one `serve build` wrote for this application."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from sdsg_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "infra" / "kuberay"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
IMAGE_ROOT = "/app/"


def manifests() -> dict[str, dict]:
    """kind -> the one manifest of that kind under infra/kuberay."""
    found: dict[str, dict] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "ray.io/v1", path
            assert doc["kind"] not in found, f"two {doc['kind']} manifests"
            found[doc["kind"]] = doc
    return found


def cluster_specs() -> list[tuple[str, dict]]:
    docs = manifests()
    return [
        ("RayCluster", docs["RayCluster"]["spec"]),
        ("RayJob", docs["RayJob"]["spec"]["rayClusterSpec"]),
        ("RayService", docs["RayService"]["spec"]["rayClusterSpec"]),
    ]


def check_entrypoint(command: str) -> None:
    """`python -m jobs.X --config C ...`: jobs/X.py exists, C exists and loads."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    module = argv[2]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{module} does not exist"
    if "--config" in argv:
        config_path = REPO / argv[argv.index("--config") + 1]
        assert config_path.is_file(), config_path
        load_config(config_path)


def test_every_config_loads_and_is_documented():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "lsun-256.yaml", "internet-512.yaml"}
    for path in CONFIGS:
        config = load_config(path)
        # Field by field: every `key: value` line carries a comment (on the line or just above it).
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s+[a-z_0-9]+:\s*\S", line) and "#" not in line:
                assert lines[i - 1].strip().startswith("#"), f"{path.name}:{i + 1} undocumented: {line.strip()}"
        if path.name != "demo.yaml":
            assert config.pipeline.root.startswith("s3://"), path
            assert config.train.data.startswith("s3://"), path
            assert config.train.gpus_per_worker >= 1 and config.score.gpus_per_actor > 0, path


def test_demo_yaml_is_the_embedded_demo_config():
    from sdsg_ray.demo import demo_config

    assert load_config(REPO / "configs" / "demo.yaml") == demo_config()
    config = demo_config()
    assert config.pipeline.make_dataset and config.train.gpus_per_worker == 0


def test_user_settings_win_over_demo_defaults():
    from sdsg_ray.demo import DEFAULT_OUT, demo_config

    config = demo_config(("set", {"pipeline.root": "/tmp/elsewhere", "train.kimg": 0.5}))
    assert config.pipeline.root == "/tmp/elsewhere" and config.train.kimg == 0.5
    assert demo_config().pipeline.root == DEFAULT_OUT
    assert config.cluster.clusters == demo_config().cluster.clusters  # untouched fields keep the demo's


def test_kuberay_clusters_autoscale_gpu_workers_behind_a_cpu_head():
    images = set()
    for kind, spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, kind
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), kind
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
        assert gpu_groups, f"{kind} has no GPU worker group"
        for group in gpu_groups:
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], kind
            assert group["maxReplicas"] > group["minReplicas"], f"{kind}: GPU group cannot scale"
        images |= {c["image"] for c in [head] + [g["template"]["spec"]["containers"][0] for g in gpu_groups]}
    assert len(images) == 1, f"one image everywhere, got {images}"


def test_rayjob_runs_the_pipeline_entrypoint():
    job = manifests()["RayJob"]["spec"]
    assert job["entrypoint"] == "python -m jobs.pipeline --config configs/internet-512.yaml"
    check_entrypoint(job["entrypoint"])
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == "/app"  # where infra/Dockerfile puts the repo


def in_checkout(value):
    """Paths inside the image (/app = the repo, see infra/Dockerfile) -> the same file in this checkout."""
    if isinstance(value, str) and value.startswith(IMAGE_ROOT):
        local = REPO / value[len(IMAGE_ROOT):]
        assert local.exists(), f"{value} is not in the repo, so it is not in the image"
        return str(local)
    return value


def serve_apps(config: dict) -> dict[str, dict]:
    return {app["name"]: app for app in config["applications"]}


def test_rayservice_serve_config_matches_serve_build_output():
    generated = yaml.safe_load((REPO / "serve_app" / "config.yaml").read_text())
    service = yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])
    assert serve_apps(service).keys() == serve_apps(generated).keys()
    for name, app in serve_apps(service).items():
        built = serve_apps(generated)[name]
        assert app["import_path"] == built["import_path"]
        assert app.get("route_prefix", "/") == built.get("route_prefix", "/")
        deployments = {d["name"]: d for d in app["deployments"]}
        built_deployments = {d["name"]: d for d in built["deployments"]}
        assert deployments.keys() == built_deployments.keys(), name
        for dname, dep in deployments.items():
            ref = built_deployments[dname]
            assert ("autoscaling_config" in dep) == ("autoscaling_config" in ref), dname
            if "autoscaling_config" in dep:
                assert dep["autoscaling_config"].keys() == ref["autoscaling_config"].keys(), dname
            assert dep.get("max_ongoing_requests") == ref.get("max_ongoing_requests"), dname


def test_deploy_yaml_options_are_what_serve_build_reports(tmp_path):
    """serve_app writes its deploy YAML from deployment_options() without Ray's private builder; Ray's own
    `serve build` on the same (default-config) application must report the same options."""
    import subprocess
    import sys

    from serve_app.app import deployment_options, serve_config_yaml

    out = tmp_path / "built.yaml"
    serve_cli = Path(sys.executable).parent / "serve"
    proc = subprocess.run([str(serve_cli), "build", "serve_app.app:app", "-o", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = {d["name"]: d for d in yaml.safe_load(out.read_text())["applications"][0]["deployments"]}
    ours = {d["name"]: d for d in yaml.safe_load(serve_config_yaml({}))["applications"][0]["deployments"]}
    assert built.keys() == ours.keys() == deployment_options(load_config().serve).keys()
    for name, mine in ours.items():
        for key, value in mine.items():
            if key == "name":
                continue
            theirs = built[name].get(key)
            if isinstance(value, dict):  # serve build may add Serve's defaults next to ours
                assert {k: theirs.get(k) for k in value} == value, (name, key, theirs)
            else:
                assert theirs == value, (name, key, theirs)


def test_rayservice_import_path_builds_a_serve_application_on_gpus():
    from ray.serve import Application

    service = yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])
    for app in service["applications"]:
        module_name, attr = app["import_path"].split(":")
        target = getattr(importlib.import_module(module_name), attr)
        args = {k: in_checkout(v) for k, v in app.get("args", {}).items()}
        built = target if isinstance(target, Application) else target(args)
        assert isinstance(built, Application), app["import_path"]
        gpu_deployments = [d for d in app["deployments"]
                           if d.get("ray_actor_options", {}).get("num_gpus", 0) > 0]
        assert gpu_deployments, "the sampler should run on GPU workers"
        assert all("autoscaling_config" in d for d in gpu_deployments)


def test_cluster_launcher_config_is_valid_for_ray_up():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((REPO / "infra" / "cluster-launcher" / "aws.yaml").read_text())
    validate_config(config)  # the JSON schema `ray up` checks
    assert config["provider"]["type"] == "aws"
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) and t["max_workers"] > t["min_workers"]
               for t in workers), "needs an autoscaling GPU worker type"
    assert "--gpus all" in config["docker"]["worker_run_options"]
    kube_image = manifests()["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert config["docker"]["image"] == kube_image


def test_dockerfile_installs_the_package_on_cuda_without_secrets():
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", text, re.M), "the package itself is pip-installed"
    assert re.search(r"^RUN pip install -r requirements\.lock$", text, re.M), "dependencies come from the lock"
    assert re.search(r"pip install --no-deps \.", text), "the package adds nothing beyond the lock"
    for copied in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (REPO / copied).exists(), copied
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|aws_secret|BEGIN .*PRIVATE KEY", text)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".env", ".aws"} <= set(ignored)


@pytest.mark.parametrize("path", sorted((REPO / "infra").rglob("*.yaml")), ids=lambda p: p.name)
def test_no_credentials_in_manifests(path):
    text = path.read_text()
    assert not re.search(r"(?i)secret_access_key|aws_access_key_id|BEGIN .*PRIVATE KEY|password:", text), path
