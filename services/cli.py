"""The `encinfer` command. Each package registers its own subcommands."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from encinfer import deploy_init, stack, web
    from encinfer.client import cli as client_cli
    from encinfer.client import demo, predict
    from encinfer.client import ghzdata
    from encinfer.common import probe
    from encinfer.inference import cli as inference_cli
    from encinfer.keystore import cli as keystore_cli
    from encinfer.keystore import s3init

    parser = argparse.ArgumentParser(prog="encinfer", description="Encrypted inference as gRPC microservices.")
    sub = parser.add_subparsers(dest="command", required=True)
    keystore_cli.register(sub)
    inference_cli.register(sub)
    client_cli.register(sub)
    demo.register(sub)
    predict.register(sub)
    ghzdata.register(sub)
    probe.register(sub)
    s3init.register(sub)
    stack.register(sub)
    deploy_init.register(sub)
    web.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
