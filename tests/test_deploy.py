"""Deployment files agree with the server: ports, probes, images, settings, and the rebuild jobs' commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from indexer.cli import parser as index_parser
from service.admin import parser as admin_parser
from service.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, ServerConfig, load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def documents() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            meta = doc["metadata"]
            docs[f"{doc['kind']}/{meta.get('name') or meta['generateName']}"] = doc
    return docs


@pytest.fixture(scope="module")
def k8s():
    return documents()


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    return doc["metadata"]["labels"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]["labels"]


PODS = ("Deployment", "Job", "Pod")


def test_every_manifest_parses_with_the_expected_kinds(k8s):
    assert {"ConfigMap/raee-serve", "Deployment/raee-serve", "Service/raee-serve", "Service/raee-serve-pods",
            "HorizontalPodAutoscaler/raee-serve", "PersistentVolumeClaim/raee-stores", "Job/raee-rebuild-sst2-",
            "Job/raee-merge-sst2-", "PodDisruptionBudget/raee-serve", "Pod/raee-seed"} == set(k8s)


def test_manifests_pass_kubernetes_validate():
    import kubernetes_validate
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, "1.30", strict=True)
    broken = documents()["Deployment/raee-serve"]
    broken["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["sleap"] = {"seconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate(broken, "1.30", strict=True)


def restricted_violations(spec: dict) -> list[str]:
    """What in a pod spec the Pod Security Standard "restricted" forbids (the checks of its current version)."""
    found = []
    pod = spec.get("securityContext", {})
    if pod.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("pod seccompProfile")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    if any("hostPath" in v for v in spec.get("volumes", [])):
        found.append("hostPath volume")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or set(sc.get("capabilities", {}).get("add", [])) - {
                "NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{c['name']}: runAsUser 0")
    return found


def test_every_pod_meets_the_restricted_pod_security_profile(k8s):
    for name, doc in k8s.items():
        if doc["kind"] in PODS:
            assert restricted_violations(pod_spec(doc)) == [], name
    assert restricted_violations({"containers": [{"name": "c"}]})  # the check can fail


def test_job_pods_stay_out_of_the_deployment_selector_and_jobs_rerun(k8s):
    selector = k8s["Deployment/raee-serve"]["spec"]["selector"]["matchLabels"]
    assert k8s["PodDisruptionBudget/raee-serve"]["spec"]["selector"]["matchLabels"] == selector
    for name, doc in k8s.items():
        if doc["kind"] in ("Job", "Pod"):
            assert not selector.items() <= pod_labels(doc).items(), name
            assert pod_labels(doc)["app"] != "raee", name  # kubectl -l app=raee lists serving pods only
        if doc["kind"] == "Job":
            assert "generateName" in doc["metadata"] and doc["spec"]["ttlSecondsAfterFinished"] > 0, name
    assert k8s["Job/raee-merge-sst2-"]["spec"]["backoffLimit"] == 0  # a failed rollout is not retried blindly


def test_the_pod_drains_before_sigterm_and_the_build_context_is_small(k8s, tmp_path):
    spec = pod_spec(k8s["Deployment/raee-serve"])
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    path = tmp_path / "serve.yaml"
    path.write_text(k8s["ConfigMap/raee-serve"]["data"]["serve.yaml"])
    config = load_config(["--config", str(path)], environ={})
    assert spec["terminationGracePeriodSeconds"] > pre_stop + config.grace_s
    assert config.max_connection_age_s > 0  # behind the ClusterIP Service, clients rebalance
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert {".venv", ".git", "stores", "service/generated"} <= set(ignored)
    assert k8s["PersistentVolumeClaim/raee-stores"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_configmap_is_a_valid_server_config_on_the_default_ports(k8s, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(k8s["ConfigMap/raee-serve"]["data"]["serve.yaml"])
    config = load_config(["--config", str(path)], environ={})
    assert (config.port, config.metrics_port) == (DEFAULT_PORT, DEFAULT_METRICS_PORT)
    assert config == ServerConfig(**{**config.__dict__})


def test_deployment_probes_ports_and_drain_time(k8s, tmp_path):
    spec = pod_spec(k8s["Deployment/raee-serve"])
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": DEFAULT_PORT, "metrics": DEFAULT_METRICS_PORT}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == DEFAULT_PORT
    assert k8s["Deployment/raee-serve"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == \
        str(DEFAULT_METRICS_PORT)
    path = tmp_path / "serve.yaml"
    path.write_text(k8s["ConfigMap/raee-serve"]["data"]["serve.yaml"])
    assert spec["terminationGracePeriodSeconds"] > load_config(["--config", str(path)], environ={}).grace_s
    assert container["args"] == ["--config", "/etc/raee/serve.yaml"]
    assert container["resources"]["requests"]["cpu"] and spec["securityContext"]["runAsNonRoot"] is True


def test_services_target_the_deployment_ports(k8s):
    labels = k8s["Deployment/raee-serve"]["spec"]["template"]["metadata"]["labels"]
    for name in ("Service/raee-serve", "Service/raee-serve-pods"):
        service = k8s[name]
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["port"] for p in service["spec"]["ports"]} <= {DEFAULT_PORT, DEFAULT_METRICS_PORT}
    assert k8s["Service/raee-serve-pods"]["spec"]["clusterIP"] == "None"
    assert k8s["HorizontalPodAutoscaler/raee-serve"]["spec"]["scaleTargetRef"]["name"] == "raee-serve"


def test_one_image_everywhere_and_the_dockerfile_matches(k8s):
    images = {c["image"] for d in k8s.values() if d["kind"] in PODS for c in pod_spec(d)["containers"]}
    assert images == {"raee:0.1.0"}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "-t raee:0.1.0 " in dockerfile and re.search(r"^USER 10001$", dockerfile, re.M)
    assert re.search(rf"^EXPOSE {DEFAULT_PORT} {DEFAULT_METRICS_PORT}$", dockerfile, re.M)
    assert dockerfile.count("FROM ") == 2
    pin = re.compile(r"pip install .*\b(torch==[\w.]+)")  # the image and `make install` pin the same torch
    assert pin.findall(dockerfile) == pin.findall((DEPLOY.parent / "Makefile").read_text())[:1]


def test_rebuild_jobs_run_commands_the_clis_accept(k8s):
    shard = k8s["Job/raee-rebuild-sst2-"]
    assert shard["spec"]["completionMode"] == "Indexed"
    count = shard["spec"]["completions"]
    build = pod_spec(shard)["containers"][0]["args"][0].replace("${JOB_COMPLETION_INDEX}", "0").split()
    assert build[0] == "raee-index"
    args = index_parser().parse_args(build[1:])
    assert args.shard == (0, count) and args.like == "/stores/sst2"  # the serving store's settings
    merge, rollout = pod_spec(k8s["Job/raee-merge-sst2-"])["containers"][0]["args"][0].split(" && ")
    merge_args = index_parser().parse_args(merge.split()[1:])
    assert len(merge_args.parts) == count and merge_args.out == "/stores/sst2" and merge_args.no_promote
    rollout_args = admin_parser().parse_args(rollout.split()[1:])
    assert rollout_args.command == "rollout" and rollout_args.version == "latest"
    assert rollout_args.every_address and rollout_args.address == f"raee-serve-pods:{DEFAULT_PORT}"
    assert rollout_args.store == merge_args.out


def test_reload_is_guarded_by_the_admin_token_secret_everywhere(k8s, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(k8s["ConfigMap/raee-serve"]["data"]["serve.yaml"])
    config = load_config(["--config", str(path)], environ={})
    assert config.admin and config.admin_token_file and config.admin_port == -1
    token_dir = str(Path(config.admin_token_file).parent)
    for name in ("Deployment/raee-serve", "Job/raee-merge-sst2-"):
        spec = pod_spec(k8s[name])
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert mounts["admin-token"]["mountPath"] == token_dir and secrets["admin-token"] == "raee-admin-token"
    reload = pod_spec(k8s["Job/raee-merge-sst2-"])["containers"][0]["args"][0].split(" && ")[1]
    assert admin_parser().parse_args(reload.split()[1:]).token_file == config.admin_token_file
