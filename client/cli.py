"""CLI commands of the client: keys, predict, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from encinfer.client import connection


def register(sub: argparse._SubParsersAction) -> None:
    register_keys(sub)


# ------------------------------------------------------------------ encinfer keys


def register_keys(sub: argparse._SubParsersAction) -> None:
    """`encinfer keys put|get|ls|rm|stat`: public key bundles on the key store."""
    keys = sub.add_parser("keys", help="upload, download, list and delete public key bundles on the key store")
    cmds = keys.add_subparsers(dest="keys_command", required=True)

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help_text)
        connection.add_arguments(p, inference=False, keystore_flag="--target")
        p.set_defaults(func=func)
        return p

    p = add("put", "upload a key bundle file; prints its key id", _put)
    p.add_argument("file", type=Path)
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the key (repeatable)")
    p.add_argument("--ttl", type=int, default=0, help="seconds until expiry (default: the server's)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")

    p = add("get", "download a key bundle (SHA-256 verified)", _get)
    p.add_argument("key_id")
    p.add_argument("-o", "--output", type=Path, required=True, help="file to write")

    p = add("ls", "list your keys", _ls)
    p.add_argument("--json", action="store_true", help="one JSON record per line")

    p = add("rm", "delete one of your keys", _rm)
    p.add_argument("key_id")

    p = add("stat", "show a key's record (is it there, until when, what parameters)", _stat)
    p.add_argument("key_id")


def _client(args: argparse.Namespace):
    from encinfer.client.keystore import KeyStoreClient
    return KeyStoreClient(args.keystore, token=args.token, tls=connection.tls_from(args))


def _record_json(record) -> dict:
    from dataclasses import asdict
    d = asdict(record)
    d["created"], d["expires"] = record.created_at.isoformat(), record.expires_at.isoformat()
    return d


def _run(args: argparse.Namespace, action) -> int:
    """Runs action(client); failures become one line and an exit code in `encinfer.cli.main`."""
    with _client(args) as client:
        return action(client)


def _bar(total: int | None, desc: str):
    from tqdm import tqdm
    # Progress on stderr, only for a person at a terminal: stdout stays parseable.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=None, leave=False)


def _put(args: argparse.Namespace) -> int:
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --label {item!r}: use KEY=VALUE", file=sys.stderr)
            return 2
        labels[key] = value

    def action(client) -> int:
        with _bar(args.file.stat().st_size, "upload") as bar:
            record = client.put(args.file, labels=labels, ttl_seconds=args.ttl, progress=bar.update)
        print(json.dumps(_record_json(record)) if args.json else record.key_id)
        return 0
    return _run(args, action)


def _get(args: argparse.Namespace) -> int:
    def action(client) -> int:
        with _bar(None, "download") as bar:
            path = client.get(args.key_id, dest=args.output, progress=bar.update)
        print(path)
        return 0
    return _run(args, action)


def _ls(args: argparse.Namespace) -> int:
    def action(client) -> int:
        for r in client.list():
            if args.json:
                print(json.dumps(_record_json(r)))
            else:
                labels = ",".join(f"{k}={v}" for k, v in sorted(r.labels.items()))
                print(f"{r.key_id}\t{r.size_bytes}\t{r.expires_at.isoformat(timespec='seconds')}\t{labels}")
        return 0
    return _run(args, action)


def _rm(args: argparse.Namespace) -> int:
    def action(client) -> int:
        if client.delete(args.key_id):
            print(f"deleted {args.key_id}")
            return 0
        # What the key store answered: it held no live key by this id for you (the line
        # says only that; a key store that removed a corrupted record answers deleted).
        print(f"error: NOT_FOUND: the key store deleted nothing: no live key {args.key_id} of yours "
              "(unknown, expired, or already deleted)", file=sys.stderr)
        return 1
    return _run(args, action)


def _stat(args: argparse.Namespace) -> int:
    def action(client) -> int:
        record = client.stat(args.key_id)
        if record is None:
            print(f"error: NOT_FOUND: key {args.key_id} not found", file=sys.stderr)
            return 1
        print(json.dumps(_record_json(record), indent=2))
        return 0
    return _run(args, action)
