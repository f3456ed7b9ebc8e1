"""Static checks of the cluster definitions: the launcher config against Ray's own schema, the KubeRay
manifests for the fields a working, token-authenticated reddino cluster needs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------- ray cluster launcher


def test_ray_cluster_yaml_validates_against_ray_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load(CLUSTER / "ray-cluster.yaml")
    jsonschema.validate(config, schema)
    validate_config(config)  # what `ray up` runs: the schema plus its own consistency checks


def test_ray_cluster_yaml_node_types_and_security():
    config = _load(CLUSTER / "ray-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu, "needs a GPU worker type (training) and a CPU worker type (Ray Data)"
    for t in gpu + cpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]

    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    setup = " ".join(config["initialization_commands"] + config["setup_commands"])
    assert "auth_token" in setup and "secretsmanager" in setup  # the token comes from the secret store
    assert "reddino" in " ".join(config["setup_commands"])


# ---------------------------------------------------------------------------------------------- KubeRay


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _check_cluster_spec(spec: dict) -> None:
    # token auth, the token from a Secret
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])

    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) >= {"gpu", "cpu"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    def limits(group):
        (container,) = group["template"]["spec"]["containers"]
        return container["resources"]["limits"]

    assert int(limits(groups["gpu"])["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in limits(groups["cpu"])

    for container in _containers(spec):
        assert container["image"]
        assert container["resources"]["limits"]["cpu"] and container["resources"]["limits"]["memory"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith(("http://", "https://"))
        assert any(m["mountPath"] == "/mnt/shared" for m in container["volumeMounts"])
    for group in [head, *spec["workerGroupSpecs"]]:
        claims = [v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["reddino-shared"]


def _no_literal_secrets(doc) -> None:
    """Every credential-looking env var is sourced from a Secret, never written out."""
    if isinstance(doc, dict):
        name = doc.get("name", "")
        if isinstance(name, str) and re.search(r"TOKEN|PASSWORD|SECRET|KEY", name) and "value" in doc:
            pytest.fail(f"literal value for {name}: use valueFrom.secretKeyRef")
        if "secretKeyRef" in doc:
            assert doc["secretKeyRef"]["name"] and doc["secretKeyRef"]["key"]
        for value in doc.values():
            _no_literal_secrets(value)
    elif isinstance(doc, list):
        for value in doc:
            _no_literal_secrets(value)


def test_raycluster_manifest():
    doc = _load(KUBERAY / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    _no_literal_secrets(doc)


@pytest.mark.parametrize("name, script", [("rayjob-pretrain.yaml", "jobs/pretrain.py"),
                                          ("rayjob-sweep.yaml", "jobs/sweep.py")])
def test_rayjob_manifests(name, script):
    doc = _load(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert script in spec["entrypoint"] and (REPO / script).exists()
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_cluster_spec(spec["rayClusterSpec"])
    _no_literal_secrets(doc)


def test_rayjob_entrypoints_parse_with_the_cli():
    """The job commands in the manifests are valid `reddino` command lines (options exist, overrides parse)."""
    import shlex

    import typer.main

    from reddino.cli import app

    group = typer.main.get_command(app)
    for name, command in [("rayjob-pretrain.yaml", "pretrain"), ("rayjob-sweep.yaml", "sweep")]:
        argv = shlex.split(_load(KUBERAY / name)["spec"]["entrypoint"])[2:]
        cmd = group.commands[command]
        ctx = cmd.make_context(f"jobs/{command}.py", list(argv), resilient_parsing=False)
        assert all("=" in o for o in ctx.params["overrides"] or [])


def test_shared_pvc_is_read_write_many():
    doc = _load(KUBERAY / "shared-pvc.yaml")
    assert doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "reddino-shared"
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dockerfile_installs_reddino_on_the_ray_base():
    text = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=(\S+)", text).group(1)
    assert base.startswith("rayproject/ray:")
    import ray

    assert base.split(":")[1].startswith(ray.__version__), "image Ray must match the client's Ray"
    assert re.search(r"pip install .*\s\.(\s|$)", text)
    assert "COPY --chown=ray:users jobs" in text
    assert not re.search(r"(TOKEN|PASSWORD)=", text)
    # the version pin in the manifests matches too
    for name in ("raycluster.yaml", "rayjob-pretrain.yaml", "rayjob-sweep.yaml"):
        doc = _load(KUBERAY / name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray.__version__


def test_runtime_env_keeps_the_upload_small():
    from ray._private.thirdparty.pathspec import PathSpec

    env = _load(REPO / "jobs" / "runtime_env.yaml")
    assert env["working_dir"] == "."
    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    for excluded in (".venv", ".git", "runs", "data", "x.db", "reddino/__pycache__", "a/b.safetensors"):
        assert spec.match_file(excluded), excluded
    for kept in ("reddino/data", "reddino/data/ingest.py", "jobs/pretrain.py", "reddino/configs/tiny_cpu.yaml"):
        assert not spec.match_file(kept), kept
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]
