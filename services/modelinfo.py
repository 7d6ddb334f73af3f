"""What a served model is, as GetModelInfo tells it: one type for the inference service
(its workers describe their models with it), the wire and the client library, with the
protobuf conversion on the type (kserve's `InferRequest.from_grpc` / `to_grpc`), so a
field is copied in one place and the two sides cannot drift apart.

Each layout is the HE code's own object (LatencyLayout, BatchLayout, CoeffLayout): the
client encrypts with exactly what the server evaluates. Class labels keep the dtype
of the labels the model was trained on: `labels()` gives them back as they were.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encinfer.he.batch import BatchLayout
from encinfer.he.coeff import CoeffLayout
from encinfer.he.latency import LatencyLayout
from encinfer.he.params import CkksParams
from encinfer.v1 import inference_pb2 as pb

Layout = LatencyLayout | BatchLayout | CoeffLayout

# The one mapping between the wire's layout enum and the layouts' names.
LAYOUT_NAMES = {pb.LAYOUT_LATENCY: "latency", pb.LAYOUT_BATCH: "batch", pb.LAYOUT_COEFF: "coeff"}
LAYOUT_ENUM = {name: value for value, name in LAYOUT_NAMES.items()}
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def typed_labels(labels: tuple[str, ...] | list[str], dtype: str) -> np.ndarray:
    """Labels carried as strings, back in the dtype they were trained with ("int64", "bool", "str", ...)."""
    arr = np.asarray(list(labels))
    if dtype.startswith(("int", "uint", "float")):
        return arr.astype(dtype)
    if dtype == "bool":
        return arr == "True"
    return arr


@dataclass(frozen=True)
class ModelDescription:
    name: str
    version: str
    kind: str                      # "classifier" | "regressor"
    sha256: str                    # of the artifact
    n_features: int
    n_outputs: int
    class_labels: tuple[str, ...]  # as strings on the wire; `labels()` types them
    class_labels_dtype: str
    layouts: dict[str, Layout] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)  # layout -> parameter hash a key must match

    def labels(self) -> np.ndarray:
        return typed_labels(self.class_labels, self.class_labels_dtype)

    def layout(self, name: str) -> Layout:
        try:
            return self.layouts[name]
        except KeyError:
            raise ValueError(f"model {self.name!r} offers no {name!r} layout; it offers "
                             f"{', '.join(self.layouts) or 'none'}") from None

    # ------------------------------------------------------------ wire
    def to_pb(self, worker: str = "", max_open_batches: int = 0) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=self.name, version=self.version, kind=self.kind, n_features=self.n_features,
            n_outputs=self.n_outputs, class_labels=list(self.class_labels),
            class_labels_dtype=self.class_labels_dtype, sha256=self.sha256, worker=worker,
            layouts=[_layout_to_pb(name, lay, self.manifests[name]) for name, lay in self.layouts.items()],
            limits=pb.Limits(max_message_bytes=MAX_MESSAGE_BYTES, max_open_batches=max_open_batches))

    @classmethod
    def from_pb(cls, info: pb.ModelInfo) -> ModelDescription:
        layouts, manifests = {}, {}
        for lay in info.layouts:
            name = LAYOUT_NAMES.get(lay.layout)
            if name is None:
                continue  # a layout this client does not know (a newer server): not usable here
            layouts[name] = _layout_from_pb(info, lay)
            manifests[name] = lay.manifest_sha256
        return cls(name=info.name, version=info.version, kind=info.kind, sha256=info.sha256,
                   n_features=info.n_features, n_outputs=info.n_outputs, class_labels=tuple(info.class_labels),
                   class_labels_dtype=info.class_labels_dtype or "str", layouts=layouts, manifests=manifests)


def _params_to_pb(p: CkksParams) -> pb.CkksParameters:
    return pb.CkksParameters(
        poly_modulus_degree=p.poly_modulus_degree, coeff_modulus_bits=p.coeff_modulus_bits,
        input_scale_bits=p.input_scale_bits, output_scale_bits=p.output_scale_bits, galois_steps=p.galois_steps,
        needs_relin_keys=p.needs_relin_keys, needs_conjugation_key=p.needs_conjugation_key,
        complex_packing=p.complex_packing, needs_public_key=p.needs_public_key)


def _params_from_pb(p: pb.CkksParameters) -> CkksParams:
    return CkksParams(
        poly_modulus_degree=p.poly_modulus_degree, coeff_modulus_bits=tuple(p.coeff_modulus_bits),
        input_scale_bits=p.input_scale_bits, output_scale_bits=p.output_scale_bits,
        galois_steps=tuple(p.galois_steps), needs_conjugation_key=p.needs_conjugation_key,
        needs_relin_keys=p.needs_relin_keys, complex_packing=p.complex_packing, needs_public_key=p.needs_public_key)


def _layout_to_pb(name: str, lay: Layout, manifest: str) -> pb.LayoutInfo:
    # A served layout carries the range its parameters were chosen for (BatchModel's default included).
    assert lay.input_range is not None
    out = pb.LayoutInfo(layout=LAYOUT_ENUM[name], parameters=_params_to_pb(lay.params), manifest_sha256=manifest,
                        input_min=lay.input_range[0], input_max=lay.input_range[1])
    if isinstance(lay, LatencyLayout):
        out.block_size, out.output_slots[:], out.feature_indices[:] = lay.block_size, lay.output_slots, \
            lay.feature_indices
    elif isinstance(lay, BatchLayout):
        out.feature_indices[:], out.max_samples = lay.feature_indices, lay.max_samples
    else:
        out.rows_per_product, out.answer_bits = lay.rows_per_product, lay.answer_bits
    return out


def _layout_from_pb(info: pb.ModelInfo, lay: pb.LayoutInfo) -> Layout:
    params = _params_from_pb(lay.parameters)
    # input_range: what the server chose the scales for (older servers: the [0, 1] default).
    extra: dict[str, Any] = {"input_range": (lay.input_min, lay.input_max)} if lay.input_max > lay.input_min else {}
    if lay.layout == pb.LAYOUT_COEFF:
        return CoeffLayout(params=params, n_features=info.n_features, n_outputs=info.n_outputs,
                           rows_per_product=lay.rows_per_product, answer_bits=lay.answer_bits, **extra)
    if lay.layout == pb.LAYOUT_LATENCY:
        # feature_indices: only when the server lists some (the model drops zero-weight pixels).
        if lay.feature_indices:
            extra["feature_indices"] = tuple(lay.feature_indices)
        return LatencyLayout(params=params, n_features=info.n_features, n_outputs=info.n_outputs,
                             block_size=lay.block_size, output_slots=tuple(lay.output_slots), **extra)
    return BatchLayout(params=params, n_features=info.n_features, n_outputs=info.n_outputs,
                       feature_indices=tuple(lay.feature_indices), max_samples=lay.max_samples, **extra)
