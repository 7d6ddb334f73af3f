"""deploy/k8s/ (kustomize), checked offline: rendered, validated against Kubernetes' own
schemas, and cross-checked.

Each overlay is rendered with the pinned kustomize (`make kustomize-bin`; `kubectl
kustomize` if that is absent). The output is validated strictly (no unknown fields)
against the OpenAPI schemas that PyPI's kubernetes-validate bundles, for the oldest
and the newest Kubernetes the manifests support, and again by kubeconform fed with the
same schemas (their `$defs` references inlined), run without a network. Schemas cannot
see cross-references, so each check below is a function returning problems: selectors,
ports, probes, environment, secrets, security context, drain timing, network reach,
MinIO's endpoints and Envoy's clusters; Envoy's configuration is also parsed and
validated by Envoy's own API types (go-control-plane). The mutation tests break a copy
of the render to show that each check can fail.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from test_deploy import CACHE, entrypoint_file_variables, go_tool, load_compose, variables_read_by_code

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
BIN = CACHE / "bin"
# The oldest Kubernetes the manifests need (native preStop sleep is on by default from
# 1.30; native gRPC probes from 1.24) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")
KEY_ID_HEADER = "x-encinfer-key-id"
ENCINFER_IMAGE = "encinfer"
# Secrets the production overlay expects the operator to create (docs/scaling.md lists
# them with their keys); the dev overlay generates the same names with placeholders.
OPERATOR_SECRETS = {
    "minio-root": {"root_user", "root_password"},
    "keystore-s3": {"access_key", "secret_key"},
    "encinfer-tokens": {"tokens.json"},
    "inference-keystore-token": {"token"},
}
# The drain variable of each encinfer server command (its SIGTERM grace).
GRACE_VARIABLE = {"keystore": "ENCINFER_KEYSTORE_SHUTDOWN_GRACE", "inference": "ENCINFER_GRACE_SECONDS"}
LISTEN_VARIABLE = {"keystore": "ENCINFER_KEYSTORE_ADDRESS", "inference": "ENCINFER_INFERENCE_ADDRESS"}
POD_KINDS = ("Deployment", "StatefulSet", "Job")

Resources = list[dict]


# ---------------------------------------------------------------------------- rendering

def kustomize_command() -> list[str]:
    pinned = BIN / "kustomize"
    if pinned.is_file():
        return [str(pinned), "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize: run `make kustomize-bin` (or install kubectl)")


def render(overlay: str) -> Resources:
    result = subprocess.run([*kustomize_command(), str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


_RENDERED: dict[str, Resources] = {}


def rendered(overlay: str) -> Resources:
    if overlay not in _RENDERED:
        _RENDERED[overlay] = render(overlay)
    return copy.deepcopy(_RENDERED[overlay])


# ---------------------------------------------------------------------------- helpers

def find(resources: Resources, kind: str, name: str) -> dict:
    for r in resources:
        if r["kind"] == kind and r["metadata"]["name"] == name:
            return r
    raise KeyError(f"{kind}/{name}")


def by_kind(resources: Resources, kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def pod_templates(resources: Resources) -> list[tuple[dict, dict]]:
    """(workload, pod template) for every workload."""
    return [(r, r["spec"]["template"]) for r in resources if r["kind"] in POD_KINDS]


def name_of(r: dict) -> str:
    return f"{r['kind']}/{r['metadata']['name']}"


def matches(selector: dict | None, labels: dict) -> bool:
    """A label selector (matchLabels form, or a Service's plain map) against labels."""
    if selector is None:
        return False
    wanted = selector.get("matchLabels", selector) if "matchExpressions" not in selector else None
    if wanted is None:
        raise AssertionError("matchExpressions are not used in these manifests; extend matches()")
    return all(labels.get(k) == v for k, v in wanted.items())


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", []) or []}


def container_ports(container: dict) -> dict:
    """containerPort numbers and names -> number."""
    ports = {}
    for p in container.get("ports", []) or []:
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def component(template: dict) -> str:
    return template["metadata"]["labels"].get("app.kubernetes.io/name", "")


def encinfer_containers(resources: Resources) -> list[tuple[dict, dict, dict]]:
    return [(w, t, c) for w, t in pod_templates(resources) for c in t["spec"]["containers"]
            if c["image"].split(":")[0] == ENCINFER_IMAGE]


def server_command(container: dict) -> str | None:
    """'keystore' or 'inference' for `encinfer keystore|inference serve`, else None."""
    args = container.get("args") or []
    return args[1] if args[:1] == ["encinfer"] and args[2:3] == ["serve"] else None


def service_port(resources: Resources, address: str) -> str | None:
    """Problem text unless host:port names a Service in the render and one of its ports."""
    host, _, port = address.rpartition(":")
    namespace = None
    if host.endswith(".svc.cluster.local"):
        host, namespace = host.split(".")[:2]
    services = [s for s in by_kind(resources, "Service") if s["metadata"]["name"] == host
                and (namespace is None or s["metadata"].get("namespace") == namespace)]
    if not services:
        return f"{address}: no Service {host!r}" + (f" in namespace {namespace}" if namespace else "")
    if int(port) not in {p["port"] for p in services[0]["spec"]["ports"]}:
        return f"{address}: Service {host} has no port {port}"
    return None


# ---------------------------------------------------------------------------- checks

def schema_problems(resources: Resources) -> list[str]:
    problems = []
    for version in KUBERNETES_VERSIONS:
        for r in resources:
            try:
                kubernetes_validate.validate(r, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{name_of(r)} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{name_of(r)}: {e.message}")
    return problems


def selector_problems(resources: Resources) -> list[str]:
    """Workload selectors match their templates; Services, PDBs, HPAs and StatefulSets point at something."""
    problems = []
    templates = pod_templates(resources)
    for w, t in templates:
        if w["kind"] != "Job" and not matches(w["spec"]["selector"], t["metadata"]["labels"]):
            problems.append(f"{name_of(w)}: selector does not match its pod template")
    for kind in ("Service", "PodDisruptionBudget"):
        for r in by_kind(resources, kind):
            selected = [w for w, t in templates if matches(r["spec"].get("selector"), t["metadata"]["labels"])]
            if not selected:
                problems.append(f"{name_of(r)}: selects no pods")
    for hpa in by_kind(resources, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        try:
            find(resources, ref["kind"], ref["name"])
        except KeyError:
            problems.append(f"{name_of(hpa)}: scales {ref['kind']}/{ref['name']}, which does not exist")
    for sts in by_kind(resources, "StatefulSet"):
        try:
            headless = find(resources, "Service", sts["spec"]["serviceName"])
            if headless["spec"].get("clusterIP") != "None":
                problems.append(f"{name_of(sts)}: serviceName {headless['metadata']['name']} is not headless")
        except KeyError:
            problems.append(f"{name_of(sts)}: serviceName {sts['spec']['serviceName']} is not a Service")
    return problems


def port_problems(resources: Resources) -> list[str]:
    """Service target ports, probe ports and addresses in env all land on a real port."""
    problems = []
    templates = pod_templates(resources)
    for svc in by_kind(resources, "Service"):
        selected = [t for _, t in templates if matches(svc["spec"].get("selector"), t["metadata"]["labels"])]
        for t in selected:
            ports = {}
            for c in t["spec"]["containers"]:
                ports.update(container_ports(c))
            for p in svc["spec"]["ports"]:
                if p.get("targetPort", p["port"]) not in ports:
                    problems.append(f"{name_of(svc)}: targetPort {p.get('targetPort')} is no container port "
                                    f"of {component(t)}")
    for w, t in templates:
        for c in t["spec"]["containers"]:
            ports = container_ports(c)
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind) or {}
                handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
                if handler and handler["port"] not in ports:
                    problems.append(f"{name_of(w)}/{c['name']}: {kind} port {handler['port']} is no container port")
            command = server_command(c)
            env = env_of(c)
            if command:
                listen = int(env.get(LISTEN_VARIABLE[command], ":0").rsplit(":", 1)[1])
                if listen not in ports:
                    problems.append(f"{name_of(w)}: listens on {listen}, which is no container port")
                for kind in ("livenessProbe", "readinessProbe"):
                    if (c.get(kind) or {}).get("grpc", {}).get("port") != listen:
                        problems.append(f"{name_of(w)}: {kind} is not a gRPC probe of its listen port {listen}")
                metrics = env.get("ENCINFER_METRICS_PORT")
                if metrics and int(metrics) not in ports:
                    problems.append(f"{name_of(w)}: metrics port {metrics} is no container port")
            for var in ("ENCINFER_KEYSTORE_TARGET", "ENCINFER_INFERENCE_TARGET", "ENCINFER_S3_ENDPOINT"):
                if var in env and (p := service_port(resources, env[var])):
                    problems.append(f"{name_of(w)}: {var}={p}")
    return problems


def compose_env(service: str) -> set[str]:
    return set(load_compose()["services"][service].get("environment") or {})


# Variables compose sets that mean nothing in Kubernetes (TLS files from compose's init
# volume; in the cluster, probes are native and plaintext inside the NetworkPolicies).
COMPOSE_ONLY = {"ENCINFER_TLS_CERT", "ENCINFER_TLS_KEY", "ENCINFER_KEYSTORE_TLS_CA", "ENCINFER_PROBE_TLS_CA",
                "ENCINFER_TLS_CA"}
# Commands other than `encinfer keystore|inference serve` whose compose service's variables a pod must set.
OTHER_COMMANDS = {("encinfer", "s3-init"): "s3-init", ("encinfer", "web"): "web"}


def env_problems(resources: Resources) -> list[str]:
    """Every variable set is read by the code; each server sets what its compose service sets, and its drain."""
    read = variables_read_by_code() | {f"{v}_FILE" for v in entrypoint_file_variables()}
    problems = []
    for w, _t, c in encinfer_containers(resources):
        env = env_of(c)
        for var in env:
            if var.startswith("ENCINFER_") and var not in read:
                problems.append(f"{name_of(w)}: sets {var}, which no code reads")
        command = server_command(c) or OTHER_COMMANDS.get(tuple(c.get("args") or ()))
        if command is None:
            continue
        wanted = compose_env(command) - COMPOSE_ONLY
        if command in GRACE_VARIABLE:
            wanted.add(GRACE_VARIABLE[command])
        for var in sorted(wanted - set(env)):
            problems.append(f"{name_of(w)}: does not set {var} (compose's {command} does)")
        for var, value in env.items():
            if re.search(r"(SECRET|SECRET_KEY|PASSWORD|ACCESS_KEY|TOKEN|TOKENS|ROOT_USER)$", var) and value:
                problems.append(f"{name_of(w)}: {var} given as a value; mount a Secret and use {var}_FILE")
    return problems


def secret_problems(resources: Resources, external: dict[str, set[str]] | None = None) -> list[str]:
    """Every *_FILE path is a key of a Secret mounted at that directory; every Secret exists."""
    external = OPERATOR_SECRETS if external is None else external
    problems = []
    secrets: dict[str, set[str]] = {}
    for s in by_kind(resources, "Secret"):
        base = re.sub(r"-[a-z0-9]{10}$", "", s["metadata"]["name"])  # kustomize's content hash
        secrets[s["metadata"]["name"]] = set(s.get("data", {})) | set(s.get("stringData", {}))
        if base in external and secrets[s["metadata"]["name"]] != external[base]:
            problems.append(f"Secret {base}: keys {sorted(secrets[s['metadata']['name']])}, "
                            f"docs/scaling.md says {sorted(external[base])}")
    for w, t in pod_templates(resources):
        volumes = {v["name"]: v for v in t["spec"].get("volumes", []) or []}
        volumes.update({v["metadata"]["name"]: {} for v in w["spec"].get("volumeClaimTemplates", [])})
        for c in t["spec"]["containers"]:
            mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts", []) or []}
            for m in c.get("volumeMounts", []) or []:
                if m["name"] not in volumes:
                    problems.append(f"{name_of(w)}: mounts undefined volume {m['name']}")
            for var, path in env_of(c).items():
                if not var.endswith("_FILE"):
                    continue
                directory, _, key = path.rpartition("/")
                secret = (mounts.get(directory) or {}).get("secret", {}).get("secretName")
                if secret is None:
                    problems.append(f"{name_of(w)}: {var}={path} is not in a mounted Secret")
                elif secret in secrets:
                    if key not in secrets[secret]:
                        problems.append(f"{name_of(w)}: {var}: Secret {secret} has no key {key}")
                elif secret in external:
                    if key not in external[secret]:
                        problems.append(f"{name_of(w)}: {var}: Secret {secret} is documented without key {key}")
                else:
                    problems.append(f"{name_of(w)}: Secret {secret} is neither generated nor documented")
    return problems


def security_problems(resources: Resources) -> list[str]:
    """The restricted Pod Security Standard and then some: non-root, read-only, no capabilities, limits."""
    problems = []
    for w, t in pod_templates(resources):
        pod = t["spec"].get("securityContext", {})
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name_of(w)}: no RuntimeDefault seccomp profile")
        if t["spec"].get("automountServiceAccountToken") is not False:
            problems.append(f"{name_of(w)}: mounts a service account token it does not need")
        for c in t["spec"]["containers"] + t["spec"].get("initContainers", []):
            sc = {**pod, **c.get("securityContext", {})}
            where = f"{name_of(w)}/{c['name']}"
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 0) == 0:
                problems.append(f"{where}: may run as root")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allows privilege escalation")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root filesystem")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: does not drop ALL capabilities (or adds some)")
            for bound in ("requests", "limits"):
                if set(c.get("resources", {}).get(bound, {})) < {"cpu", "memory"}:
                    problems.append(f"{where}: no cpu and memory {bound}")
            if ":" not in c["image"] or c["image"].endswith(":latest"):
                problems.append(f"{where}: image {c['image']} is not pinned to a tag")
    return problems


def probe_problems(resources: Resources) -> list[str]:
    """Every long-running container is probed; `encinfer web` by an HTTP GET of the path it answers itself."""
    from encinfer.web import HEALTH_PATH

    problems = []
    for w, t in pod_templates(resources):
        if w["kind"] == "Job":
            continue
        for c in t["spec"]["containers"]:
            for kind in ("livenessProbe", "readinessProbe"):
                if kind not in c:
                    problems.append(f"{name_of(w)}/{c['name']}: no {kind}")
                elif c.get("args") == ["encinfer", "web"]:
                    get = c[kind].get("httpGet") or {}
                    listen = int(env_of(c).get("ENCINFER_WEB_ADDRESS", ":0").rsplit(":", 1)[1])
                    if get.get("path") != HEALTH_PATH or container_ports(c).get(get.get("port")) != listen:
                        problems.append(f"{name_of(w)}: {kind} is not an HTTP GET of {HEALTH_PATH} "
                                        f"on its listen port {listen}")
    return problems


def drain_problems(resources: Resources) -> list[str]:
    """Termination grace covers the preStop sleep plus the server's own drain."""
    problems = []
    for w, t in pod_templates(resources):
        if w["kind"] != "Deployment":
            continue
        for c in t["spec"]["containers"]:
            sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            if not sleep:
                problems.append(f"{name_of(w)}/{c['name']}: no preStop sleep (endpoints would not drain first)")
                continue
            command = server_command(c)
            drain = float(env_of(c).get(GRACE_VARIABLE[command], "nan")) if command else 0.0
            if drain != drain:
                problems.append(f"{name_of(w)}: does not set {GRACE_VARIABLE[command]}")
                continue
            grace = t["spec"].get("terminationGracePeriodSeconds", 30)
            if grace < sleep + drain:
                problems.append(f"{name_of(w)}: terminationGracePeriodSeconds {grace} < preStop {sleep} s "
                                f"+ drain {drain:g} s")
    return problems


def allowed(resources: Resources, source: dict, target: dict, port: int, foreign: bool = False) -> bool:
    """Whether the NetworkPolicies let pods labelled `source` open TCP `port` on pods labelled `target`.

    foreign: the source is a pod in another namespace, which none of these policies governs
    (its egress is open); only peers with a namespaceSelector can match it.
    """
    def peer_ok(peer: dict, labels: dict) -> bool:
        if "ipBlock" in peer:
            return True
        if foreign and "namespaceSelector" not in peer:
            return False  # a bare podSelector means this namespace
        if peer.get("namespaceSelector") not in (None, {}):
            return foreign  # a selected other namespace; never ours in these manifests
        return matches(peer.get("podSelector", {}), labels)

    def port_ok(rule: dict) -> bool:
        ports = rule.get("ports")
        return not ports or any(p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port) for p in ports)

    def direction(kind: str, subject: dict, other: dict) -> bool:
        policies = [p for p in by_kind(resources, "NetworkPolicy")
                    if kind in p["spec"].get("policyTypes", ["Ingress"]) and matches(p["spec"]["podSelector"], subject)]
        if not policies:
            return True
        key, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        return any(port_ok(rule) and (peers not in rule or any(peer_ok(x, other) for x in rule[peers]))
                   for p in policies for rule in p["spec"].get(key, []) or [])

    egress = True if foreign else direction("Egress", source, target)
    return egress and direction("Ingress", target, source)


def labels_of(resources: Resources, name: str) -> dict:
    for _, t in pod_templates(resources):
        if component(t) == name:
            return t["metadata"]["labels"]
    raise KeyError(name)


# (source, target, port): the edges the system needs, and the ones it must not have.
NEEDED_EDGES = [("inference", "keystore", 50051), ("keystore", "minio", 9000), ("s3-init", "minio", 9000),
                ("minio", "minio", 9000), ("proxy", "inference", 50052), ("proxy", "keystore", 50051),
                ("web", "keystore", 50051), ("web", "proxy", 8080)]
FORBIDDEN_TARGETS = {"minio": {"keystore", "s3-init", "minio"}}


def network_problems(resources: Resources) -> list[str]:
    problems = []
    for source, target, port in NEEDED_EDGES:
        if not allowed(resources, labels_of(resources, source), labels_of(resources, target), port):
            problems.append(f"{source} cannot reach {target}:{port}")
    pods = [component(t) for _, t in pod_templates(resources)]
    for target, permitted in FORBIDDEN_TARGETS.items():
        ports = set(container_ports(next(c for _, t in pod_templates(resources) if component(t) == target
                                         for c in t["spec"]["containers"])).values())
        for source in pods:
            for port in ports:
                if source not in permitted and allowed(resources, labels_of(resources, source),
                                                       labels_of(resources, target), port):
                    problems.append(f"{source} can reach {target}:{port}")
        # Nor any other pod, in this namespace or another (whose egress no policy here limits).
        for port in ports:
            for foreign in (False, True):
                if allowed(resources, {"app.kubernetes.io/name": "stranger", "encinfer.io/client": "true"},
                           labels_of(resources, target), port, foreign=foreign):
                    problems.append(f"a pod {'in another namespace' if foreign else 'of no component'} "
                                    f"can reach {target}:{port}")
    return problems


def minio_problems(resources: Resources) -> list[str]:
    """The server arguments name exactly the StatefulSet's pods, by their headless DNS names, on their PVC."""
    sts = find(resources, "StatefulSet", "minio")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    namespace, service = sts["metadata"].get("namespace"), sts["spec"]["serviceName"]
    endpoints = [a for a in container["args"] if a.startswith(("http://", "https://"))]
    problems = []
    if sts["spec"]["replicas"] != 4:
        problems.append(f"MinIO runs {sts['spec']['replicas']} pods, not 4")
    if len(endpoints) != 1:
        return problems + [f"MinIO arguments name {len(endpoints)} endpoint patterns, want one"]
    m = re.fullmatch(r"https?://minio-\{0\.\.\.(\d+)\}\.([^./]+)\.([^./]+)\.svc\.cluster\.local(/.+)", endpoints[0])
    if not m:
        return problems + [f"MinIO endpoint {endpoints[0]!r} is not "
                           "minio-{0...N}.<service>.<ns>.svc.cluster.local/<dir>"]
    last, host_service, host_namespace, path = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if last + 1 != sts["spec"]["replicas"]:
        problems.append(f"MinIO endpoints name {last + 1} pods, the StatefulSet runs {sts['spec']['replicas']}")
    if (host_service, host_namespace) != (service, namespace):
        problems.append(f"MinIO endpoints are under {host_service}.{host_namespace}, "
                        f"the pods under {service}.{namespace}")
    claims = {v["metadata"]["name"] for v in sts["spec"].get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if mounts.get(path) not in claims:
        problems.append(f"MinIO's drive {path} is not a PersistentVolumeClaim of each pod")
    return problems


def scaling_problems(resources: Resources) -> list[str]:
    problems = []
    hpas = [h for h in by_kind(resources, "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "inference"}]
    if not hpas or not any(m.get("resource", {}).get("name") == "cpu" for m in hpas[0]["spec"].get("metrics", [])):
        problems.append("inference has no HPA on CPU")
    labels = labels_of(resources, "inference")
    if not any(matches(p["spec"]["selector"], labels) for p in by_kind(resources, "PodDisruptionBudget")):
        problems.append("inference has no PodDisruptionBudget")
    keystore = find(resources, "Deployment", "keystore")
    if keystore["spec"].get("replicas", 1) < 2:
        problems.append("the key store runs fewer than 2 replicas")
    return problems


def envoy_config(resources: Resources) -> tuple[dict, dict]:
    """(the proxy Deployment, Envoy's config from the ConfigMap it mounts at the -c path)."""
    proxy = find(resources, "Deployment", "proxy")
    spec = proxy["spec"]["template"]["spec"]
    container = spec["containers"][0]
    config_path = container["args"][container["args"].index("-c") + 1]
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config_map = find(resources, "ConfigMap", volume["configMap"]["name"])
    return proxy, yaml.safe_load(config_map["data"][config_path[len(mount["mountPath"]) + 1:]])


def envoy_problems(resources: Resources) -> list[str]:
    """Envoy hashes Inference calls on the key-id header over HTTP/2 upstreams it health-checks by gRPC."""
    try:
        proxy, config = envoy_config(resources)
    except (KeyError, StopIteration, ValueError) as e:
        return [f"the proxy's Envoy config cannot be found: {e}"]
    problems = []
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    listener = config["static_resources"]["listeners"][0]
    proxy_ports = container_ports(proxy["spec"]["template"]["spec"]["containers"][0])
    if listener["address"]["socket_address"]["port_value"] not in proxy_ports.values():
        problems.append("Envoy listens on a port the proxy container does not declare")
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    for route in routes:
        if route["route"]["cluster"] not in clusters:
            problems.append(f"route {route['match']} goes to unknown cluster {route['route']['cluster']}")
    inference_routes = [r for r in routes if r["match"].get("prefix") == "/encinfer.v1.Inference/"]
    if (not inference_routes
            or inference_routes[0]["route"].get("hash_policy") != [{"header": {"header_name": KEY_ID_HEADER}}]):
        problems.append(f"Inference calls are not hashed on {KEY_ID_HEADER}")
    else:
        target = clusters.get(inference_routes[0]["route"]["cluster"], {})
        if target.get("lb_policy") != "RING_HASH":
            problems.append("the inference cluster does not use ring_hash")
    for name, cluster in clusters.items():
        options = cluster.get("typed_extension_protocol_options", {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        if "http2_protocol_options" not in options.get("explicit_http_config", {}):
            problems.append(f"cluster {name}: upstream is not HTTP/2 (gRPC needs it)")
        if not any("grpc_health_check" in h for h in cluster.get("health_checks", [])):
            problems.append(f"cluster {name}: no gRPC health check")
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                if p := service_port(resources, f"{address['address']}:{address['port_value']}"):
                    problems.append(f"cluster {name}: {p}")
    return problems


# Envoy's configuration, checked against Envoy's own API: go-control-plane's generated
# types parse it (unknown fields and unknown typed_config types fail, every Any is
# resolved) and their protoc-gen-validate rules run on every message, Any contents
# included. A few lines of Go, built once and cached (tests/test_deploy.go_tool).
ENVOY_API = "github.com/envoyproxy/go-control-plane/envoy"
ENVOY_API_VERSION = "v1.35.0"
ENVOY_CHECK_GO = """\
package main

import (
	"fmt"
	"io"
	"os"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

type validator interface{ ValidateAll() error }

// check runs the message's validation rules, then those of every message inside it,
// unpacking Any fields (PGV does not look inside them).
func check(m protoreflect.Message) error {
	if v, ok := m.Interface().(validator); ok {
		if err := v.ValidateAll(); err != nil {
			return err
		}
	}
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("%s: %w", a.GetTypeUrl(), err)
		}
		return check(inner.ProtoReflect())
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind {
			return true
		}
		switch {
		case fd.IsList():
			for i := 0; i < v.List().Len() && err == nil; i++ {
				err = check(v.List().Get(i).Message())
			}
		case fd.IsMap():
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				if fd.MapValue().Kind() == protoreflect.MessageKind {
					err = check(mv.Message())
				}
				return err == nil
			})
		default:
			err = check(v.Message())
		}
		return err == nil
	})
	return err
}

// Usage: envoycheck < bootstrap.json
func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(data, &b); err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(1)
	}
	if err := check(proto.Message(&b).ProtoReflect()); err != nil {
		fmt.Fprintln(os.Stderr, "invalid:", err)
		os.Exit(1)
	}
}
"""


def envoy_check_binary() -> Path:
    return go_tool("envoycheck", ENVOY_CHECK_GO, ENVOY_API, ENVOY_API_VERSION)


def envoy_api_problems(resources: Resources) -> list[str]:
    """Envoy's config as Envoy's API defines it (field names, types, validation rules)."""
    try:
        _, config = envoy_config(resources)
    except (KeyError, StopIteration, ValueError) as e:
        return [f"the proxy's Envoy config cannot be found: {e}"]
    result = subprocess.run([str(envoy_check_binary())], input=json.dumps(config), capture_output=True, text=True,
                            timeout=60)
    return [result.stderr.strip()] if result.returncode != 0 else []


CHECKS: dict[str, Callable[[Resources], list[str]]] = {
    "schema": schema_problems, "selectors": selector_problems, "ports": port_problems, "env": env_problems,
    "secrets": secret_problems, "security": security_problems, "probes": probe_problems, "drain": drain_problems,
    "network": network_problems, "minio": minio_problems, "scaling": scaling_problems, "envoy": envoy_problems,
    "envoy_api": envoy_api_problems,
}


# ---------------------------------------------------------------------------- the real manifests

@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("check", list(CHECKS))
def test_overlay_passes_check(overlay, check):
    assert CHECKS[check](rendered(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_topology(overlay):
    kinds = {(r["kind"], r["metadata"]["name"]) for r in rendered(overlay)}
    assert {("StatefulSet", "minio"), ("Job", "s3-init"), ("Deployment", "keystore"), ("Deployment", "inference"),
            ("Deployment", "proxy"), ("HorizontalPodAutoscaler", "inference"), ("Service", "minio-headless"),
            ("Deployment", "web"), ("Service", "web")} <= kinds
    assert {r["metadata"].get("namespace") for r in rendered(overlay) if r["kind"] != "Namespace"} == {"encinfer"}


def test_dev_overlay_generates_every_secret_from_placeholders():
    secrets = {re.sub(r"-[a-z0-9]{10}$", "", s["metadata"]["name"]) for s in by_kind(rendered("dev"), "Secret")}
    assert secrets == set(OPERATOR_SECRETS)


def test_dev_tokens_give_inference_the_service_role_with_its_own_token():
    import base64
    secrets = {re.sub(r"-[a-z0-9]{10}$", "", s["metadata"]["name"]): s["data"]
               for s in by_kind(rendered("dev"), "Secret")}
    table = json.loads(base64.b64decode(secrets["encinfer-tokens"]["tokens.json"]))
    token = base64.b64decode(secrets["inference-keystore-token"]["token"]).decode()
    assert table[token] == {"owner": "inference", "role": "service"}


def test_production_overlay_commits_no_secret():
    assert by_kind(rendered("production"), "Secret") == []


def test_operator_secrets_are_documented():
    text = (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
    for name, keys in OPERATOR_SECRETS.items():
        assert name in text and all(k in text for k in keys), name


_DEF_REF = re.compile(r'"(?:/api/_definitions\.json)?#/\$defs/([^"]+)"')


def reachable_definitions(text: str, definitions: dict) -> dict:
    """The definitions a schema refers to, directly or through others (all 800-odd would be compiled)."""
    found: dict = {}
    pending = _DEF_REF.findall(text)
    while pending:
        name = pending.pop()
        if name not in found:
            found[name] = definitions[name]
            pending += _DEF_REF.findall(json.dumps(found[name]))
    return json.loads(json.dumps(found).replace('"/api/_definitions.json#/$defs/', '"#/$defs/'))


def inlined_schemas(version: str, kinds: Iterable[tuple[str, str]]) -> Path:
    """kubernetes-validate's strict schemas for these kinds, each made self-contained (kubeconform
    resolves no `/api/_definitions.json` references), under ~/.cache/encinfer."""
    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    out = (CACHE / "k8s-schemas" / f"kubernetes-validate-{kubernetes_validate.version.__version__}"
           / f"v{version}-strict-pruned")
    out.mkdir(parents=True, exist_ok=True)
    definitions = json.loads((source / "_definitions.json").read_text(encoding="utf-8"))["$defs"]
    for kind, api_version in kinds:
        group, _, ver = api_version.rpartition("/")
        name = f"{kind.lower()}-{group.split('.')[0] + '-' if group else ''}{ver}.json"
        target = out / name
        if target.exists():
            continue
        schema = json.loads((source / name).read_text(encoding="utf-8"))
        schema.pop("$id", None)
        text = json.dumps(schema).replace('"/api/_definitions.json#/$defs/', '"#/$defs/')
        schema = json.loads(text)
        schema["$defs"] = reachable_definitions(text, definitions)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(schema), encoding="utf-8")
        tmp.replace(target)
    return out


def offline(argv: list[str]) -> list[str]:
    """argv in a new network namespace with no interfaces up, where that is possible (root):
    then nothing it does can reach a network."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", *argv]
    return argv


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubeconform_accepts_the_overlay_with_local_schemas_only(overlay, tmp_path):
    kubeconform = BIN / "kubeconform"
    if not kubeconform.is_file():
        pytest.skip("kubeconform not built: `make kubeconform-bin`")
    resources = rendered(overlay)
    schemas = inlined_schemas(KUBERNETES_VERSIONS[-1], {(r["kind"], r["apiVersion"]) for r in resources})
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(resources), encoding="utf-8")
    result = subprocess.run(offline([str(kubeconform), "-strict", "-summary", "-output", "json", "-n", "1",
                                     "-schema-location", str(schemas) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json",
                                     str(manifest)]), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["valid"] == len(resources) and summary["skipped"] == 0, summary


def test_kubeconform_rejects_an_unknown_field(tmp_path):
    kubeconform = BIN / "kubeconform"
    if not kubeconform.is_file():
        pytest.skip("kubeconform not built: `make kubeconform-bin`")
    resources = rendered("dev")
    find(resources, "Deployment", "inference")["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    schemas = inlined_schemas(KUBERNETES_VERSIONS[-1], {(r["kind"], r["apiVersion"]) for r in resources})
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump_all(resources), encoding="utf-8")
    result = subprocess.run(offline([str(kubeconform), "-strict", "-n", "1", "-schema-location",
                                     str(schemas) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json", str(manifest)]),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "livenesProbe" in result.stdout


# ---------------------------------------------------------------------------- the checks can fail

def container(resources: Resources, kind: str, name: str) -> dict:
    return find(resources, kind, name)["spec"]["template"]["spec"]["containers"][0]


def set_env(kind: str, name: str, var: str, value: str | None) -> Callable[[Resources], None]:
    def mutate(resources: Resources) -> None:
        c = container(resources, kind, name)
        c["env"] = [e for e in c["env"] if e["name"] != var]
        if value is not None:
            c["env"].append({"name": var, "value": value})
    return mutate


def edit(kind: str, name: str, fn: Callable[[dict], None]) -> Callable[[Resources], None]:
    return lambda resources: fn(find(resources, kind, name))


def first_container(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda r: fn(r["spec"]["template"]["spec"]["containers"][0])


def allow_to_minio(source: str) -> Callable[[Resources], None]:
    def mutate(resources: Resources) -> None:
        policy = find(resources, "NetworkPolicy", "minio")
        policy["spec"]["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": source}}})
        find(resources, "NetworkPolicy", source)["spec"]["egress"].append(
            {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "minio"}}}]})
    return mutate


def edit_envoy(fn: Callable[[dict], None]) -> Callable[[Resources], None]:
    def mutate(resources: Resources) -> None:
        proxy, config = envoy_config(resources)
        fn(config)
        name = next(v for v in proxy["spec"]["template"]["spec"]["volumes"] if "configMap" in v)["configMap"]["name"]
        find(resources, "ConfigMap", name)["data"]["envoy.yaml"] = yaml.safe_dump(config)
    return mutate


def _inference_route(config: dict) -> dict:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


MUTATIONS = {
    "unknown field": ("schema", edit("Deployment", "keystore", lambda r: r["spec"].update(replica=2))),
    "probe as a string port number": ("schema", edit("Deployment", "inference", first_container(
        lambda c: c["livenessProbe"]["grpc"].update(port="50052")))),
    "wrong Service selector": ("selectors", edit("Service", "keystore", lambda r: r["spec"].update(
        selector={"app.kubernetes.io/name": "key-store"}))),
    "PDB selecting nothing": ("selectors", edit("PodDisruptionBudget", "inference", lambda r: r["spec"].update(
        selector={"matchLabels": {"app.kubernetes.io/name": "inferencer"}}))),
    "StatefulSet without its headless Service": ("selectors", edit("StatefulSet", "minio",
                                                                   lambda r: r["spec"].update(serviceName="minio"))),
    "broken probe port": ("ports", edit("Deployment", "inference", first_container(
        lambda c: c["readinessProbe"]["grpc"].update(port=50051)))),
    "Service targeting a port nobody listens on": ("ports", edit("Service", "inference-headless",
                                                                 lambda r: r["spec"]["ports"][0].update(
                                                                     targetPort=50053))),
    "key store target on the wrong port": ("ports", set_env("Deployment", "inference", "ENCINFER_KEYSTORE_TARGET",
                                                            "keystore:50052")),
    "key store target naming no Service": ("ports", set_env("Deployment", "inference", "ENCINFER_KEYSTORE_TARGET",
                                                            "key-store:50051")),
    "missing env var": ("env", set_env("Deployment", "inference", "ENCINFER_KEYSTORE_TOKEN_FILE", None)),
    "missing drain variable": ("env", set_env("Deployment", "keystore", "ENCINFER_KEYSTORE_SHUTDOWN_GRACE", None)),
    "variable no code reads": ("env", set_env("Deployment", "keystore", "ENCINFER_KEYSTORE_PORTT", "1")),
    "credential as a plain value": ("env", set_env("Deployment", "keystore", "ENCINFER_S3_SECRET_KEY", "hunter22")),
    "secret file outside any mount": ("secrets", set_env("Deployment", "inference", "ENCINFER_KEYSTORE_TOKEN_FILE",
                                                         "/run/secrets/elsewhere/token")),
    "secret key that does not exist": ("secrets", set_env("Deployment", "inference", "ENCINFER_KEYSTORE_TOKEN_FILE",
                                                          "/run/secrets/inference-token/tokn")),
    "container running as root": ("security", edit("Deployment", "inference", lambda r: r["spec"]["template"]["spec"][
        "securityContext"].update(runAsUser=0))),
    "writable root filesystem": ("security", edit("StatefulSet", "minio", first_container(
        lambda c: c["securityContext"].update(readOnlyRootFilesystem=False)))),
    "capability added": ("security", edit("Deployment", "proxy", first_container(
        lambda c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"])))),
    "no limits": ("security", edit("Deployment", "keystore", first_container(lambda c: c["resources"].pop("limits")))),
    "no readiness probe": ("probes", edit("Deployment", "keystore", first_container(
        lambda c: c.pop("readinessProbe")))),
    "grace shorter than the drain": ("drain", edit("Deployment", "inference", lambda r: r["spec"]["template"][
        "spec"].update(terminationGracePeriodSeconds=10))),
    "no preStop sleep": ("drain", edit("Deployment", "keystore", first_container(lambda c: c.pop("lifecycle")))),
    "NetworkPolicy lets inference reach MinIO": ("network", allow_to_minio("inference")),
    "NetworkPolicy lets web reach MinIO": ("network", allow_to_minio("web")),
    "web cut off from the proxy": ("network", edit("NetworkPolicy", "web", lambda r: r["spec"]["egress"].pop(1))),
    "key store refusing web": ("network", edit("NetworkPolicy", "keystore",
                                               lambda r: r["spec"]["ingress"][0]["from"].pop(2))),
    "web's inference target naming no Service": ("ports", set_env("Deployment", "web", "ENCINFER_INFERENCE_TARGET",
                                                                  "inference:50052")),
    "web's Service targeting a port nobody listens on": (
        "ports", edit("Service", "web", lambda r: r["spec"]["ports"][0].update(targetPort=8081))),
    "web without its key store target": ("env", set_env("Deployment", "web", "ENCINFER_KEYSTORE_TARGET", None)),
    "web probed on a path it does not serve": ("probes", edit("Deployment", "web", first_container(
        lambda c: c["readinessProbe"]["httpGet"].update(path="/ready")))),
    "web probed by gRPC": ("probes", edit("Deployment", "web", first_container(
        lambda c: c.update(livenessProbe={"grpc": {"port": 8080}})))),
    "web running as root": ("security", edit("Deployment", "web", lambda r: r["spec"]["template"]["spec"][
        "securityContext"].update(runAsUser=0))),
    "MinIO open to every pod": ("network", edit("NetworkPolicy", "minio",
                                                lambda r: r["spec"]["ingress"][0].pop("from"))),
    "inference cut off from the key store": ("network", edit("NetworkPolicy", "inference",
                                                             lambda r: r["spec"].update(egress=[]))),
    "MinIO with 3 pods": ("minio", edit("StatefulSet", "minio", lambda r: r["spec"].update(replicas=3))),
    "MinIO endpoints in another namespace": ("minio", edit("StatefulSet", "minio", first_container(
        lambda c: c["args"].__setitem__(1, c["args"][1].replace(".encinfer.svc", ".default.svc"))))),
    "no HPA": ("scaling", lambda rs: rs.remove(find(rs, "HorizontalPodAutoscaler", "inference"))),
    "hash on another header": ("envoy", edit_envoy(lambda c: _inference_route(c)["hash_policy"][0]["header"].update(
        header_name="x-key-id"))),
    "round robin instead of ring hash": ("envoy", edit_envoy(
        lambda c: c["static_resources"]["clusters"][0].update(lb_policy="ROUND_ROBIN"))),
    "upstream on HTTP/1.1": ("envoy", edit_envoy(lambda c: c["static_resources"]["clusters"][0].pop(
        "typed_extension_protocol_options"))),
    "misspelt Envoy field": ("envoy_api", edit_envoy(lambda c: c["static_resources"]["clusters"][0].update(
        lb_polcy="RING_HASH"))),
    "unknown Envoy load-balancing policy": ("envoy_api", edit_envoy(
        lambda c: c["static_resources"]["clusters"][0].update(lb_policy="CONSISTENT_HASH"))),
    "Envoy filter config of an unknown type": ("envoy_api", edit_envoy(lambda c: c["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"].update({"@type": "type.googleapis.com/envoy.Nope"}))),
    "Envoy rule inside a typed_config broken": ("envoy_api", edit_envoy(lambda c: _inference_route(c)["hash_policy"][0][
        "header"].update(header_name=""))),
    "upstream on the wrong port": ("envoy", edit_envoy(lambda c: c["static_resources"]["clusters"][0][
        "load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"].update(
        port_value=50051))),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_check_catches_broken_manifests(mutation):
    check, mutate = MUTATIONS[mutation]
    resources = rendered("dev")
    mutate(resources)
    assert CHECKS[check](resources) != []


def test_production_secret_check_catches_an_undocumented_secret():
    assert secret_problems(rendered("production"), external={}) != []
