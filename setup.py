"""Generates the gRPC stubs from protos/ as part of every build (wheel or editable)."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement, see pyproject.toml

    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={ROOT / 'protos'}", f"--pyi_out={ROOT / 'protos'}",
            f"--grpc_python_out={ROOT / 'protos'}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on protos/")


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


if __name__ == "__main__":  # setuptools runs this file as __main__; `make stubs` imports it
    setup(cmdclass={"build_py": BuildWithStubs})
