"""Packaging tells the truth: what the code imports is declared, the locks pin every declared
dependency, and the stub generator is pinned to the locked grpcio."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The runtime packages, and modules that only dev tools, tests and benchmarks import.
RUNTIME_SOURCES = ["services", "client"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _locked(path: Path) -> dict[str, str]:
    """{package: version} of a uv lock (several lines for one package under markers: the first)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", line)
        if m:
            out.setdefault(m.group(1).lower().replace("_", "-"), m.group(2))
    return out


def _parse(path: Path) -> ast.Module:
    """ast.parse in a fresh thread: CPython 3.11's AST validator miscounts its recursion depth
    when called deep in a stack some extension modules have touched ("AST constructor
    recursion depth mismatch", seen in the full suite); a new thread starts at depth 0."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ast.parse, path.read_text(), str(path)).result()


def _imports(root: Path) -> set[str]:
    """Top-level module names imported anywhere under root (absolute imports only)."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if "_pb2" in path.name:
            continue
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _declared(extras: tuple[str, ...] = ()) -> set[str]:
    deps = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra in extras:
        deps |= {_name(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]}
    return deps


def test_every_third_party_module_the_services_and_client_import_is_declared():
    dists = packages_distributions()
    declared = _declared(("demo", "dev"))
    missing = {}
    for root in RUNTIME_SOURCES:
        for module in _imports(REPO / root):
            if module in sys.stdlib_module_names or module in ("encinfer", "grpc_tools", "__future__"):
                continue
            owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
            if owners and not owners & declared:
                missing[module] = sorted(owners)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_runtime_lock_pins_every_runtime_dependency():
    locked = _locked(REPO / "requirements" / "runtime.txt")
    assert not _declared() - locked.keys(), "re-run `make lock`"


def test_dev_lock_pins_every_declared_dependency():
    locked = _locked(REPO / "requirements" / "dev.txt")
    assert not (_declared(("demo", "dev")) - {"encinfer"}) - locked.keys(), "re-run `make lock`"


def test_runtime_lock_and_dev_lock_agree_on_shared_packages():
    runtime, dev = _locked(REPO / "requirements" / "runtime.txt"), _locked(REPO / "requirements" / "dev.txt")
    differ = {name: (v, dev[name]) for name, v in runtime.items() if name in dev and dev[name] != v}
    assert not differ, f"the image and the dev set-up would run different versions: {differ}"


def test_stub_generator_is_pinned_to_the_locked_grpcio_tools_and_not_newer_than_grpcio():
    build = [r for r in PYPROJECT["build-system"]["requires"] if _name(r) == "grpcio-tools"]
    assert len(build) == 1 and "==" in build[0], "pin grpcio-tools exactly in [build-system]"
    pinned = build[0].split("==")[1]
    locked = _locked(REPO / "requirements" / "dev.txt")
    assert locked["grpcio-tools"] == pinned

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])
    assert version(locked["grpcio"]) >= version(pinned), "stubs refuse a grpcio older than their generator"


def test_requires_python_matches_the_oldest_interpreter_tenseal_has_wheels_for():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def test_serving_needs_neither_the_demo_nor_the_dev_extra():
    runtime = _declared()
    for extra_only in ("matplotlib", "mlxtend", "pytest", "pyyaml"):
        assert extra_only not in runtime
