"""Offline checks of the Kubernetes and KServe manifests in ``deploy/k8s`` (docs/kubernetes.md).

No cluster is involved. Every kustomization renders with ``kubectl kustomize``; core kinds validate with
kubernetes-validate against :data:`KUBERNETES_VERSION`'s schemas, strict (an unknown field fails, as
``kubectl apply``'s default server-side field validation would refuse it); KServe kinds validate with
jsonschema against the KServe CRDs in ``../shared/schemas/kserve``, made strict the same way; the
ServiceMonitor (its CRD is not here) is checked structurally only. The rest are the rules the manifests must
keep with the code and the images: the images are those ``docker compose`` builds, TorchServe's
configuration is :func:`cnnserve.torchserve.render_config`'s, the gateway's environment is its settings, the
drain fits the grace period, the worker threads fit the CPU quota.

Skipped, saying why, where kubectl, kubernetes-validate or the KServe CRDs are missing.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cnnserve.gateway.settings import OPTIONS, add_arguments, parse_address, settings_from_args
from cnnserve.torchserve import _LOG4J2, TorchServeSettings, render_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KSERVE_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kserve"
KUBERNETES_VERSION = "1.33"  # the cluster version the manifests target (native sidecars are GA there)

# Every kustomization a user applies, relative to deploy/k8s; the components are rendered through
# examples/cpu-prometheus. test_every_kustomization_is_rendered keeps this list complete.
KUSTOMIZATIONS = (
    "base",
    "overlays/cpu",
    "overlays/gpu",
    "examples/cpu-prometheus",
    "kserve/base",
    "kserve/canary",
)
COMPONENTS = ("components/monitoring", "components/hpa-in-flight")
KSERVE_KINDS = {"ServingRuntime", "ClusterServingRuntime", "InferenceService"}
STRUCTURAL_ONLY_KINDS = {"ServiceMonitor"}  # monitoring.coreos.com: no CRD schema here

TOKEN_SECRET = ("cnnserve-gateway-token", "token")
# Cores kept for TorchServe's Java frontend (netty, batching) besides the workers' threads.
FRONTEND_CORES = 1.0
# What TorchServe gets after the gateway drained: nothing is in flight any more, so `torchserve --stop` only
# waits for the JVM and the workers to exit. Not measured on a cluster; compose allows 60 s for a stop with
# calls still running.
TORCHSERVE_STOP_S = 20
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri (kserve-container)


# --- rendering and loading --------------------------------------------------------------------------------


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered (kubectl kustomize)")
    return kubectl


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(name: str) -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/k8s/<name>`` as a list of objects (cached: the manifests do not change)."""
    if name not in _rendered:
        result = subprocess.run(
            [_kubectl(), "kustomize", str(K8S / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        _rendered[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return copy.deepcopy(_rendered[name])


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in all_containers(spec) if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name}, found {len(matches)}"
    return matches[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment or Job, or a ServingRuntime's spec (its containers and volumes)."""
    if doc["kind"] == "ServingRuntime":
        return dict(doc["spec"])
    return dict(doc["spec"]["template"]["spec"])


def env(c: dict[str, Any]) -> dict[str, str]:
    """A container's literal environment (valueFrom entries map to "")."""
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def mount_path(c: dict[str, Any], volume: str) -> str:
    paths = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == volume]
    assert len(paths) == 1, f"{c['name']} mounts volume {volume} {len(paths)} times"
    return str(paths[0])


def server_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    """(kustomization, pod spec) of each rendering's cnnserve pod (the Deployment's, the ServingRuntime's)."""
    for name in KUSTOMIZATIONS:
        docs = render(name)
        if name.startswith("kserve/"):
            yield name, pod_spec(find(docs, "ServingRuntime", "cnnserve"))
        else:
            yield name, pod_spec(find(docs, "Deployment", "cnnserve"))


def torchserve_container(spec: dict[str, Any]) -> dict[str, Any]:
    names = {c["name"] for c in all_containers(spec)}
    return container(spec, "kserve-container" if "kserve-container" in names else "torchserve")


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the InferenceService CRD is 2 MB


@functools.cache
def kserve_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    if not KSERVE_SCHEMAS.is_dir():
        pytest.skip(
            f"the KServe CRDs are not at {KSERVE_SCHEMAS} (../shared/schemas/kserve from the project root; "
            "see its README): KServe manifests not validated"
        )
    group, version = api_version.split("/")
    path = KSERVE_SCHEMAS / f"{group}_{kind.lower()}s.yaml"  # controller-gen's <group>_<plural>.yaml
    assert path.exists(), f"no CRD for {kind} in {KSERVE_SCHEMAS}"
    crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == group, path
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return jsonschema.Draft7Validator(strict_schema(entry["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"{path.name} has no version {version}")


def strict_schema(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does (CRD
    schemas leave additionalProperties open; the server prunes or, with kubectl's default, refuses)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: strict_schema(value) for key, value in schema.items() if key != "properties"}
    if "properties" in schema:  # a map of field name -> schema, not a schema itself
        strict["properties"] = {key: strict_schema(value) for key, value in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            strict["additionalProperties"] = False
    return strict


def validate_kserve(doc: dict[str, Any]) -> None:
    kserve_validator(doc["kind"], doc["apiVersion"]).validate(doc)


def kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is missing (a dev dependency: pip install kubernetes-validate==1.37.0)",
    )


def compose_images() -> set[str]:
    """The images docker compose builds: docker-compose.yml and the GPU override, defaults expanded."""
    images = set()
    for path in (ROOT / "docker-compose.yml", ROOT / "service" / "docker" / "compose.gpu.yml"):
        for service in yaml.safe_load(path.read_text())["services"].values():
            if "image" in service:
                images.add(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["image"]))
    return images


# --- rendering and schemas -------------------------------------------------------------------------------


def test_every_kustomization_is_rendered() -> None:
    found = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS) | set(COMPONENTS)
    example = yaml.safe_load((K8S / "examples" / "cpu-prometheus" / "kustomization.yaml").read_text())
    assert sorted(Path(c).as_posix().removeprefix("../../") for c in example["components"]) == sorted(
        COMPONENTS
    )


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_core_kinds_validate(name: str) -> None:
    validator = kubernetes_validate()
    docs = render(name)
    assert docs
    errors = []
    for doc in docs:
        if doc["kind"] in KSERVE_KINDS | STRUCTURAL_ONLY_KINDS:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            validator.validate(doc, KUBERNETES_VERSION, strict=True)
        except validator.SchemaNotFoundError as error:
            errors.append(f"{where}: no Kubernetes {KUBERNETES_VERSION} schema: {error.message}")
        except validator.ValidationError as error:
            errors.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
    assert errors == [], f"{name} does not validate against Kubernetes {KUBERNETES_VERSION}"


@pytest.mark.parametrize("name", ["kserve/base", "kserve/canary"])
def test_kserve_kinds_validate_against_the_crds(name: str) -> None:
    docs = [d for d in render(name) if d["kind"] in KSERVE_KINDS]
    assert {d["kind"] for d in docs} == {"ServingRuntime", "InferenceService"}
    errors = []
    for doc in docs:
        try:
            validate_kserve(doc)
        except jsonschema.ValidationError as error:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.json_path}: {error.message}")
    assert errors == [], f"{name} does not validate against the KServe CRDs"


def test_the_validators_refuse_broken_manifests() -> None:
    """The checks above can fail: an unknown field and a wrong type, in a core kind and in a KServe kind."""
    validator = kubernetes_validate()
    deployment = find(render("overlays/cpu"), "Deployment", "cnnserve")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = find(render("overlays/cpu"), "Deployment", "cnnserve")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, KUBERNETES_VERSION, strict=True)
    runtime = find(render("kserve/base"), "ServingRuntime")
    runtime["spec"]["protocolVersion"] = ["v2"]  # the field is protocolVersions
    with pytest.raises(jsonschema.ValidationError):
        validate_kserve(runtime)
    runtime = find(render("kserve/base"), "ServingRuntime")
    runtime["spec"]["multiModel"] = "no"
    with pytest.raises(jsonschema.ValidationError):
        validate_kserve(runtime)


def test_service_monitor_structure() -> None:
    """No CRD here: the ServiceMonitor must select the gateway Service and name its metrics port."""
    docs = render("examples/cpu-prometheus")
    monitor = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == find(docs, "Deployment", "cnnserve")["metadata"]["namespace"]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s
        for s in docs
        if s["kind"] == "Service" and wanted.items() <= s["metadata"].get("labels", {}).items()
    ]
    assert [s["metadata"]["name"] for s in services] == ["cnnserve-gateway"]
    ports = {p["name"] for p in services[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"] and all(e["port"] in ports for e in monitor["spec"]["endpoints"])
    assert {e.get("path", "/metrics") for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"] == [
        "cnnserve_gateway_in_flight_rpcs"
    ]


# --- what the manifests must keep with the code and the images --------------------------------------------


def test_images_are_the_ones_docker_compose_builds() -> None:
    built = compose_images()
    assert {"cnnserve/builder:0.1.0", "cnnserve/gateway:0.1.0", "cnnserve/torchserve:0.1.0"} <= built
    for name in KUSTOMIZATIONS:
        docs = render(name)
        used = {
            c["image"]
            for d in docs
            if d["kind"] in {"Deployment", "Job", "ServingRuntime"}
            for c in all_containers(pod_spec(d))
        }
        assert used and used <= built, f"{name} names images compose does not build: {sorted(used - built)}"


def test_torchserve_config_is_render_configs() -> None:
    for name, spec in server_pods():
        docs = render(name)
        torchserve = torchserve_container(spec)
        config_volume = next(v for v in spec["volumes"] if v["name"] == "torchserve-config")
        config_map = find(docs, "ConfigMap", config_volume["configMap"]["name"])
        store = KSERVE_MODEL_DIR if name.startswith("kserve/") else mount_path(torchserve, "model-store")
        variables = env(torchserve)
        settings = TorchServeSettings(
            model_store=Path(store),
            state_dir=Path(variables["CNNSERVE_STATE_DIR"]) / "torchserve",
            revisions_dir=Path(variables["CNNSERVE_REVISIONS_DIR"]),
        )
        config = config_map["data"]["config.properties"]
        assert config == render_config(settings), name
        addresses = re.findall(r"^\w+_address=(?:http://)?([^:\n]+)", config, re.MULTILINE)
        assert len(addresses) == 5 and set(addresses) == {"127.0.0.1"}, (
            "TorchServe's APIs must not leave the pod"
        )
        # The entrypoint reads the configuration from the state directory, where the container copies it.
        assert mount_path(torchserve, "state") == variables["CNNSERVE_STATE_DIR"]
        assert mount_path(torchserve, "torchserve-config") in " ".join(torchserve["args"])
        assert config_map["data"]["log4j2.xml"] == _LOG4J2, name
        assert mount_path(torchserve, "revisions") == variables["CNNSERVE_REVISIONS_DIR"]
        assert "ports" not in torchserve or name.startswith("kserve/"), "TorchServe exposes no port"
        gateway = env(container(spec, "gateway"))
        assert gateway["CNNSERVE_TORCHSERVE_GRPC"] == settings.grpc_inference_target
        assert gateway["CNNSERVE_TORCHSERVE_MANAGEMENT_GRPC"] == settings.grpc_management_target
        assert gateway["CNNSERVE_TORCHSERVE_KEY_FILE"] == str(settings.key_file)
        assert Path(gateway["CNNSERVE_TORCHSERVE_KEY_FILE"]).is_relative_to(
            mount_path(container(spec, "gateway"), "state")
        )


def test_gateway_environment_is_its_settings() -> None:
    known = {variable for variable, _ in OPTIONS.values()}
    for name, spec in server_pods():
        gateway = container(spec, "gateway")
        variables = env(gateway)
        assert sorted(set(variables) - known) == [], name
        token = next(e for e in gateway["env"] if e["name"] == "CNNSERVE_GATEWAY_TOKEN")
        reference = token["valueFrom"]["secretKeyRef"]
        assert (reference["name"], reference["key"]) == TOKEN_SECRET and not reference.get("optional", False)
        parser = argparse.ArgumentParser()
        add_arguments(parser, {**variables, "CNNSERVE_GATEWAY_TOKEN": "set-from-the-secret"})
        settings = settings_from_args(parser.parse_args([]))  # types and addresses as the gateway reads them
        ports = {p["name"]: p["containerPort"] for c in all_containers(spec) for p in c.get("ports", [])}
        http_port = parse_address(variables["CNNSERVE_GATEWAY_HTTP_LISTEN"])[1]
        grpc_port = parse_address(settings.listen)[1]
        metrics_port = parse_address(settings.metrics_listen)[1]
        if name.startswith("kserve/"):  # KServe's port names on kserve-container (see servingruntime.yaml)
            assert (ports["h2c"], ports["http1"], ports["metrics"]) == (grpc_port, http_port, metrics_port)
        else:
            assert ports == {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}, name
        assert gateway["readinessProbe"]["grpc"]["port"] == grpc_port
        assert gateway["readinessProbe"]["grpc"].get("service", "") == ""
        assert gateway["livenessProbe"] != gateway["readinessProbe"]
        assert gateway["livenessProbe"]["tcpSocket"]["port"] == grpc_port


def test_shutdown_fits_the_grace_period() -> None:
    for name, spec in server_pods():
        gateway = container(spec, "gateway")
        drain = float(env(gateway)["CNNSERVE_GATEWAY_GRACE_SECONDS"])
        pre_stop = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop >= 1, "endpoints need a moment to drop the pod before the gateway refuses calls"
        torchserve = torchserve_container(spec)
        if name.startswith("kserve/"):
            # All containers get SIGTERM at once: TorchServe waits out the gateway's preStop and drain.
            grace = find(render(name), "InferenceService")["spec"]["predictor"][
                "terminationGracePeriodSeconds"
            ]
            torchserve_wait = torchserve["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert torchserve_wait >= pre_stop + drain, name
            assert grace >= torchserve_wait + TORCHSERVE_STOP_S, name
        else:
            # TorchServe is a sidecar: SIGTERM reaches it once the gateway has exited.
            assert torchserve.get("restartPolicy") == "Always", "TorchServe must be a native sidecar"
            assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + TORCHSERVE_STOP_S, name


def test_worker_threads_fit_the_cpu_quota() -> None:
    from cnnserve_export.bootstrap import DEFAULT_MODELS
    from cnnserve_export.config import default_settings

    workers = sum(default_settings(model).max_workers for model in DEFAULT_MODELS)
    for name, spec in server_pods():
        torchserve = torchserve_container(spec)
        variables = env(torchserve)
        threads = int(variables["CNNSERVE_WORKER_THREADS"])
        assert int(variables["OMP_NUM_THREADS"]) <= threads
        if name.startswith("kserve/"):  # the InferenceService's predictor.model.resources win
            resources = find(render(name), "InferenceService")["spec"]["predictor"]["model"]["resources"]
        else:
            resources = torchserve["resources"]
        limit = cpu_cores(resources["limits"]["cpu"])
        assert workers * threads + FRONTEND_CORES <= limit, f"{name}: {workers} workers x {threads} threads"
        assert cpu_cores(resources["requests"]["cpu"]) == limit, f"{name}: the quota is what is reserved"
    for name in ("overlays/cpu", "overlays/gpu"):
        builder = container(pod_spec(find(render(name), "Job", "cnnserve-builder")), "builder")
        assert int(env(builder)["OMP_NUM_THREADS"]) <= cpu_cores(builder["resources"]["limits"]["cpu"])


def test_pod_wiring() -> None:
    for name in ("overlays/cpu", "overlays/gpu"):
        docs = render(name)
        deployment = find(docs, "Deployment", "cnnserve")
        spec = pod_spec(deployment)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        # Init containers start in order: the archives first, then the TorchServe sidecar.
        assert [c["name"] for c in spec["initContainers"]] == ["wait-for-archives", "torchserve"], name
        assert "startupProbe" in container(spec, "torchserve")
        for service in (d for d in docs if d["kind"] == "Service"):
            assert service["spec"]["selector"].items() <= labels.items()
            targets = {p["targetPort"] for p in service["spec"]["ports"]}
            assert targets <= {p["name"] for p in container(spec, "gateway")["ports"]}
        headless = find(docs, "Service", "cnnserve-gateway-headless")
        assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get(
            "publishNotReadyAddresses"
        )
        for kind, key in (("PodDisruptionBudget", "selector"), ("NetworkPolicy", "podSelector")):
            assert find(docs, kind, "cnnserve")["spec"][key]["matchLabels"].items() <= labels.items(), kind
        policy = find(docs, "NetworkPolicy", "cnnserve")["spec"]
        admitted = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        assert admitted == {p["containerPort"] for p in container(spec, "gateway")["ports"]}
        assert policy["egress"] == [] and "Egress" in policy["policyTypes"]
        hpa = find(docs, "HorizontalPodAutoscaler", "cnnserve")["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cnnserve"}
        assert hpa["minReplicas"] >= 2, "the PodDisruptionBudget needs a second pod to drain one"
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        for volume in ("model-store", "revisions"):
            claim = find(docs, "PersistentVolumeClaim", claims[volume])
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod mounts it"
        stores = [
            m for c in all_containers(spec) for m in c.get("volumeMounts", []) if m["name"] == "model-store"
        ]
        assert stores and all(m.get("readOnly") for m in stores), "only the builder Job writes the archives"
        job = find(docs, "Job", "cnnserve-builder")
        builder = container(pod_spec(job), "builder")
        builder_policy = find(docs, "NetworkPolicy", "cnnserve-builder")["spec"]
        assert (
            builder_policy["podSelector"]["matchLabels"].items()
            <= job["spec"]["template"]["metadata"]["labels"].items()
        )
        assert builder_policy["ingress"] == builder_policy["egress"] == []
        # The Job writes the archives where its image says (CNNSERVE_MODEL_STORE), then the marker the pods
        # wait for.
        dockerfile = (ROOT / "service" / "docker" / "Dockerfile.builder").read_text()
        store = re.search(r"CNNSERVE_MODEL_STORE=(\S+)", dockerfile)
        assert store and mount_path(builder, "model-store") == store.group(1)
        marker = re.search(r'touch "\$CNNSERVE_MODEL_STORE/([^"]+)"', builder["args"][0])
        wait = container(spec, "wait-for-archives")
        assert marker and f"{mount_path(wait, 'model-store')}/{marker.group(1)} ]" in wait["args"][0]
        assert mount_path(wait, "model-store") == mount_path(container(spec, "torchserve"), "model-store")


def test_gpu_overlay() -> None:
    cpu, gpu = render("overlays/cpu"), render("overlays/gpu")
    for docs, device in ((cpu, "cpu"), (gpu, "gpu")):
        spec = pod_spec(find(docs, "Deployment", "cnnserve"))
        torchserve = container(spec, "torchserve")
        builder = container(pod_spec(find(docs, "Job", "cnnserve-builder")), "builder")
        assert env(builder)["CNNSERVE_ARCHIVE_DEVICE"] == device
        gpus = int(torchserve["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        if device == "gpu":
            assert gpus >= 1 and torchserve["image"].startswith("cnnserve/torchserve-gpu:")
            assert env(torchserve)["CNNSERVE_REQUIRE_DEVICE"] == "true"
        else:
            assert gpus == 0 and torchserve["image"].startswith("cnnserve/torchserve:")


def test_kserve_runtime_and_inference_service() -> None:
    base, canary = render("kserve/base"), render("kserve/canary")
    runtime = find(base, "ServingRuntime")["spec"]
    service = find(base, "InferenceService")["spec"]["predictor"]
    model = service["model"]
    assert model["runtime"] == find(base, "ServingRuntime")["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert {"v2", "grpc-v2"} <= set(runtime["protocolVersions"]) and model["protocolVersion"] in runtime[
        "protocolVersions"
    ]
    assert runtime["multiModel"] is False
    assert container(runtime, "kserve-container")["image"].startswith("cnnserve/torchserve")
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in runtime["volumes"] if "persistentVolumeClaim" in v
    ]
    assert [find(base, "PersistentVolumeClaim", c)["spec"]["accessModes"] for c in claims] == [
        ["ReadWriteMany"]
    ]
    assert model["storageUri"].endswith("/"), "storageUri is the directory of .mar archives"
    assert "canaryTrafficPercent" not in service
    canary_predictor = find(canary, "InferenceService")["spec"]["predictor"]
    assert 0 < canary_predictor["canaryTrafficPercent"] < 100
    assert canary_predictor["model"]["storageUri"] != model["storageUri"]
