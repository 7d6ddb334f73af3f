"""CLI commands of the key store service: `encinfer keystore serve`."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keystore", help="the key store service")
    cmds = p.add_subparsers(dest="keystore_command", required=True)
    serve = cmds.add_parser("serve", help="run the key store (configured by ENCINFER_* environment variables; "
                                          "see docs/config-keystore.md)")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from encinfer.keystore.server import main
    return main()
