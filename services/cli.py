"""The `encinfer` command. Each package registers its own subcommands.

Failures are one line on stderr and an exit code, decided here once for every command:

  1  a service or the system refused: `error: UNAVAILABLE: <the server's message>`
     (every encinfer error, and files that cannot be read or written)
  2  the command line or the input is wrong: `error: <what is wrong>` (argparse's
     usage errors, and inputs the client refuses before sending, e.g. NaN pixels)

ENCINFER_TRACEBACK=1 shows the Python traceback instead (for a bug report).
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from encinfer import deploy_init, stack, web
    from encinfer.client import cli as client_cli
    from encinfer.client import demo, ghzdata, predict
    from encinfer.common import probe
    from encinfer.inference import cli as inference_cli
    from encinfer.keystore import cli as keystore_cli
    from encinfer.keystore import s3init

    parser = argparse.ArgumentParser(prog="encinfer", description="Encrypted inference as gRPC microservices.",
                                     epilog="exit codes: 0 ok, 1 a service or the system refused, "
                                            "2 the command line or the input is wrong")
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


def failure(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, the one line to print) for a failure a person can act on; None for a bug."""
    from encinfer.common.errors import EncinferError, from_status

    grpc = sys.modules.get("grpc")  # loaded by every command that makes calls
    if grpc is not None and isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        exc = from_status(exc.code().name, exc.details() or "")
    if isinstance(exc, EncinferError):
        return EXIT_FAILED, f"error: {exc.code}: {exc}"
    if isinstance(exc, ValueError):
        return EXIT_USAGE, f"error: {exc}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return EXIT_FAILED, f"error: {exc.strerror or exc}{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # decided in failure(); a bug keeps its traceback
        decided = failure(exc)
        if decided is None or os.environ.get("ENCINFER_TRACEBACK"):
            raise
        code, line = decided
        print(" ".join(line.split()), file=sys.stderr)  # one line, whatever the message holds
        return code


if __name__ == "__main__":
    sys.exit(main())
