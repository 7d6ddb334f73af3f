"""Concrete ML 1.9 as a peer: its LogisticRegression, deployed the way its docs deploy it.

Runs inside the Concrete ML environment (bench/concrete-venv, `make concrete-peer`: torch and
its CUDA wheels, a few GB, so never in the project's own environment), reading the training
and test images from an .npz that bench.peers writes, and printing one result row as JSON.

Per image, as a deployed client and server would: the client quantizes, encrypts and
serializes (`FHEModelClient.quantize_encrypt_serialize`); the server runs the compiled
circuit on the serialized input with the serialized evaluation keys (`FHEModelServer.run`);
the client deserializes, decrypts and dequantizes. Agreement is with Concrete ML's own
clear (quantized, fhe="disable") model, accuracy against the true labels.

    bench/concrete-venv/bin/python bench/concrete_peer.py data.npz --images 100 --n-bits 8
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help=".npz with X_train, y_train, X_test, y_test (pixels in [0, 1])")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--n-bits", type=int, default=8)
    args = parser.parse_args(argv)

    from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer
    from concrete.ml.sklearn import LogisticRegression

    data = np.load(args.data)
    X_train, y_train = data["X_train"], data["y_train"]
    X, y = data["X_test"][:args.images], data["y_test"][:args.images]

    t0 = time.perf_counter()
    model = LogisticRegression(n_bits=args.n_bits, max_iter=1000)
    model.fit(X_train, y_train)
    model.compile(X_train)
    compile_s = time.perf_counter() - t0
    float_model = model.sklearn_model  # the float scikit-learn model it quantized
    clear = model.predict(X, fhe="disable")

    work = Path(tempfile.mkdtemp(prefix="concrete-peer-"))
    try:
        FHEModelDev(str(work / "model"), model).save()
        client = FHEModelClient(str(work / "model"), key_dir=str(work / "keys"))
        client.generate_private_and_evaluation_keys()
        eval_keys = client.get_serialized_evaluation_keys()
        server = FHEModelServer(str(work / "model"))
        server.load()
        enc_s, srv_s, dec_s, up, down, preds = [], [], [], [], [], []
        for x in X:
            t = time.perf_counter()
            query = client.quantize_encrypt_serialize(x.reshape(1, -1))
            enc_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            answer = server.run(query, eval_keys)
            srv_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            scores = client.deserialize_decrypt_dequantize(answer)
            dec_s.append(time.perf_counter() - t)
            up.append(len(query))
            down.append(len(answer))
            preds.append(int(np.argmax(scores, axis=1)[0]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    preds_a = np.asarray(preds)
    enc_ms, srv_ms, dec_ms = (1e3 * float(np.mean(t)) for t in (enc_s, srv_s, dec_s))
    row = {
        "system": f"Concrete ML 1.9 (n_bits={args.n_bits})",
        "layout": "per image",
        "client_encrypt_ms_per_image": enc_ms,
        "server_ms_per_image": srv_ms,
        "client_decrypt_ms_per_image": dec_ms,
        "e2e_ms_per_image": enc_ms + srv_ms + dec_ms,
        "bytes_up_per_image": float(np.mean(up)),
        "bytes_down_per_image": float(np.mean(down)),
        "key_bytes": len(eval_keys),
        "agreement": float(np.mean(preds_a == np.asarray(clear))),
        "accuracy": float(np.mean(preds_a == y)),
        "n_images": int(len(X)),
        "float_model_accuracy": float(np.mean(float_model.predict(X) == y)),
        "compile_s": compile_s,
        "notes": "its own quantized model, trained on the same images; agreement is with its clear (quantized) "
                 "model; key_bytes are the evaluation keys",
    }
    json.dump(row, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
