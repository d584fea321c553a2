"""deploy/kubernetes, checked without an API server: built-in kinds and pod templates against the `kubernetes`
client's models (strictly: a field the model lacks fails), the RayCluster's own fields against KubeRay's."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
CLUSTER = "snapkernel"
TOKEN_SECRET, TOKEN_KEY, S3_SECRET = "snapkernel-token", "token", "snapkernel-s3"
FRONT_PORT = 7419
GPU = "nvidia.com/gpu"
MODELS = {("node.k8s.io/v1", "RuntimeClass"): "V1RuntimeClass", ("v1", "Secret"): "V1Secret",
          ("v1", "Service"): "V1Service", ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy"}
# KubeRay's ray.io/v1 RayCluster fields (ray-operator/config/crd/bases/ray.io_rayclusters.yaml, v1.7.0). The API
# server prunes fields its schema lacks without a word, so a misspelt one would simply vanish.
SPEC_FIELDS = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
               "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
               "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
HEAD_FIELDS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
               "serviceType", "template"}
WORKER_FIELDS = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
                 "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "template"}
AUTH_FIELDS = {"enableK8sTokenAuth", "mode", "secretName"}

Doc = dict[str, Any]


@functools.cache
def files() -> dict[str, list[Doc]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(DEPLOY.glob("*.yaml"))}


def manifests() -> list[Doc]:
    return [d for name, docs in files().items() if name != "kustomization.yaml" for d in docs]


def only(kind: str, name: str | None = None) -> Doc:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {DEPLOY}"
    return found[0]


def differ(a: Any, b: Any, path: str = "") -> str:
    """The first path where `a` and `b` differ ("" where they don't)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(a.keys() | b.keys(), key=lambda k: (k in a and k in b, k))  # a key missing on one side first
        return next((differ(a.get(k), b.get(k), f"{path}.{k}") for k in keys if a.get(k) != b.get(k)), "")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((differ(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), "")
    return f"{path or '.'}: {a!r} != {b!r}" if a != b else ""


def strict(data: Any, model: str) -> None:
    """Deserialize `data` as the client's `model` and back: a key the model does not know is dropped, and fails."""
    api = ApiClient()
    again = api.sanitize_for_serialization(api._ApiClient__deserialize(data, model))
    assert again == data, f"not a {model}: {differ(data, again)}"


def groups(rc: Doc) -> list[tuple[str, str, Doc]]:
    """(node type, group name, group spec) of the head and each worker group."""
    spec = rc["spec"]
    return [("head", "headgroup", spec["headGroupSpec"]),
            *(("worker", g["groupName"], g) for g in spec["workerGroupSpecs"])]


def pod_labels(rc: Doc, node_type: str, group: str, spec: Doc) -> dict[str, str]:
    """The labels KubeRay gives the group's pods: the template's, the group's Ray labels and its own."""
    return {**spec["template"].get("metadata", {}).get("labels", {}), **spec.get("labels", {}),
            "ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": node_type, "ray.io/group": group}


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "this test reads matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def ray_resources(params: dict[str, str]) -> dict[str, float]:
    """`resources` of rayStartParams: KubeRay pastes it into a shell command line, so it must be single-quoted."""
    raw = params.get("resources", "'{}'")
    assert raw[0] == raw[-1] == "'" and "'" not in raw[1:-1], f"resources must be shell-quoted JSON: {raw}"
    parsed: dict[str, float] = json.loads(raw[1:-1])
    assert all(isinstance(v, int | float) for v in parsed.values()), parsed
    return parsed


def front_container(rc: Doc) -> Doc:
    front: Doc
    (front,) = (c for c in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
                if "snapkernel backend" in " ".join(c.get("command", []) + c.get("args", [])))
    return front


@pytest.fixture
def rc() -> Doc:
    return only("RayCluster")


def test_kustomization_lists_exactly_the_manifests() -> None:
    (kustomization,) = files()["kustomization.yaml"]
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(set(files()) - {"kustomization.yaml"})


def test_builtin_kinds_are_valid_client_models() -> None:
    for doc in manifests():
        if (doc["apiVersion"], doc["kind"]) != ("ray.io/v1", "RayCluster"):
            assert (doc["apiVersion"], doc["kind"]) in MODELS, f"unchecked kind {doc['apiVersion']} {doc['kind']}"
            strict(doc, MODELS[doc["apiVersion"], doc["kind"]])


def test_raycluster_fields(rc: Doc) -> None:
    assert set(rc) == {"apiVersion", "kind", "metadata", "spec"}
    strict(rc["metadata"], "V1ObjectMeta")
    assert rc["metadata"]["name"] == CLUSTER
    spec = rc["spec"]
    assert set(spec) <= SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_FIELDS
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)), names
    for node_type, name, group in groups(rc):
        if node_type == "worker":
            assert WORKER_REQUIRED <= set(group) <= WORKER_FIELDS, name
            replicas = [group["minReplicas"], group.get("replicas", group["minReplicas"]), group["maxReplicas"]]
            assert all(type(n) is int for n in replicas) and 0 <= replicas[0] <= replicas[1] <= replicas[2], name
        strict(group["template"], "V1PodTemplateSpec")
        params, labels = group.get("rayStartParams", {}), group.get("labels", {})
        assert all(isinstance(v, str) for v in [*params.values(), *labels.values()]), f"{name}: strings only"
        assert "labels" not in params, f"{name}: KubeRay refuses rayStartParams['labels']: use the group's labels"
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params)), (
            f"{name}: KubeRay refuses resources both in rayStartParams and the group's resources")


def test_ray_token_auth_reaches_the_front(rc: Doc) -> None:
    auth = rc["spec"]["authOptions"]
    assert set(auth) <= AUTH_FIELDS and auth["mode"] == "token"
    assert tuple(int(x) for x in rc["spec"]["rayVersion"].split(".")) >= (2, 52, 0), "KubeRay: token auth needs it"
    # KubeRay gives the token to the Ray container only: the front's container names the Secret itself.
    front = front_container(rc)
    assert env(front)["RAY_AUTH_MODE"]["value"] == "token"
    ref = env(front)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": auth.get("secretName", rc["metadata"]["name"]), "key": "auth_token"}


def test_ray_resources_and_gpus(rc: Doc) -> None:
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not any(k.startswith("snapkernel_") for k in ray_resources(head["rayStartParams"])), "no daemon on head"
    for _, name, group in groups(rc)[1:]:
        resources = ray_resources(group["rayStartParams"])
        assert resources["snapkernel_node"] == 1000, name
        runtimes = {k for k in resources if k.startswith("snapkernel_runtime_")}
        assert runtimes and runtimes <= {"snapkernel_runtime_gvisor", "snapkernel_runtime_process"}, name
        assert all(resources[k] == 1000 for k in runtimes), name
        models = {k.removeprefix("snapkernel_gpu_"): v for k, v in resources.items() if k.startswith("snapkernel_gpu_")}
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"].get("limits", {})
        requests = pod["containers"][0]["resources"].get("requests", {})
        assert name.startswith("gpu-") == bool(models), f"{name}: GPU groups are named gpu-*"
        if not models:
            assert GPU not in {*limits, *requests} and "snapkernel.io/gpu-model" not in group.get("labels", {}), name
            assert "nvidia.com/gpu.product" not in pod.get("nodeSelector", {}), name
            continue
        ((model, count),) = models.items()
        assert limits[GPU] == requests.get(GPU, limits[GPU]) == str(int(count)), f"{name}: {GPU} != {count}"
        assert group["rayStartParams"].get("num-gpus", limits[GPU]) == limits[GPU], name
        assert group["labels"]["snapkernel.io/gpu-model"] == model, name
        assert model in pod["nodeSelector"]["nvidia.com/gpu.product"], name


def test_every_group_gets_the_token_state_dir_and_s3(rc: Doc) -> None:
    token = only("Secret", TOKEN_SECRET)
    assert TOKEN_KEY in {**token.get("data", {}), **token.get("stringData", {})}
    s3 = only("Secret", S3_SECRET)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {*s3.get("data", {}), *s3.get("stringData", {})}
    for node_type, name, group in groups(rc):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        # The daemons run in the Ray container of each worker (the first one); on the head, the front does.
        readers = [front_container(rc)] if node_type == "head" else [pod["containers"][0]]
        for container in readers:
            where = f"{name}/{container['name']}"
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            token_file = Path(env(container)["SNAPKERNEL_TOKEN_FILE"]["value"])
            mount = mounts[str(token_file.parent)]
            secret = volumes[mount["name"]]["secret"]
            assert secret["secretName"] == TOKEN_SECRET and mount.get("readOnly") is True, where
            paths = {i["key"]: i["path"] for i in secret.get("items", [])} or {TOKEN_KEY: TOKEN_KEY}
            assert paths[TOKEN_KEY] == token_file.name, where
            state = volumes[mounts[env(container)["SNAPKERNEL_STATE_DIR"]["value"]]["name"]]
            assert {"emptyDir", "hostPath"} & set(state), f"{where}: state dir on an emptyDir or hostPath"
            assert {"secretRef": {"name": S3_SECRET}} in container.get("envFrom", []), where


def test_workers_are_privileged_and_the_head_is_not(rc: Doc) -> None:
    for node_type, name, group in groups(rc):
        containers = group["template"]["spec"]["containers"]
        privileged = [c.get("securityContext", {}).get("privileged", False) for c in containers]
        assert privileged[0] is (node_type == "worker") and not any(privileged[1:]), name


def test_the_service_reaches_the_front(rc: Doc) -> None:
    front = front_container(rc)
    command = " ".join(front["command"] + front.get("args", []))
    for flag in ("--placement ray", "--ray-address ", f"--listen 0.0.0.0:{FRONT_PORT}",
                 "--BackendApp.snapshot_store=s3://"):
        assert flag in command, flag
    (port,) = (p for p in front["ports"] if p["containerPort"] == FRONT_PORT)
    service = only("Service", "snapkernel-front")
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == FRONT_PORT and service_port["targetPort"] in (FRONT_PORT, port.get("name"))
    head = groups(rc)[0]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(rc, *head))
    assert not any(selects({"matchLabels": service["spec"]["selector"]}, pod_labels(rc, *g)) for g in groups(rc)[1:])


def test_networkpolicy_admits_the_cluster_only(rc: Doc) -> None:
    spec = only("NetworkPolicy")["spec"]
    head, *workers = [pod_labels(rc, *g) for g in groups(rc)]
    assert spec["policyTypes"] == ["Ingress"]
    assert all(selects(spec["podSelector"], w) for w in workers) and not selects(spec["podSelector"], head)
    rules = spec["ingress"]
    for rule in rules:
        assert "from" in rule, "a rule without `from` admits every address"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"a peer outside this namespace's pods: {peer}"
            assert peer["podSelector"]["matchLabels"]["ray.io/cluster"] == CLUSTER, peer
    # Ray (and the front's calls to each daemon) use ports picked at start: any port, from head and workers.
    for labels in (head, *workers):
        assert any("ports" not in r and any(selects(p["podSelector"], labels) for p in r["from"]) for r in rules)


def test_runtimeclass_is_gvisor() -> None:
    runtime_class = only("RuntimeClass", "gvisor")
    assert runtime_class["handler"] == "runsc"
    assert runtime_class["scheduling"]["nodeSelector"] and runtime_class["overhead"]["podFixed"]
