"""Served models: a safe artifact plus its precomputed HE layouts.

Built once per process (SEAL objects cannot cross processes), so each worker
loads the artifacts itself and pre-encodes the weights for every layout.
Single samples: "coeff" (coefficient encoding, no rotation) is what the client
library uses; "latency" (rotations) stays for callers without a complex encoder
and as the basis of non-linear models. Many samples: "batch".
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from encinfer.common.errors import ConfigError, InvalidArgument, NotFound
from encinfer.he.batch import BatchModel
from encinfer.he.coeff import CoeffModel, common_a
from encinfer.he.latency import LatencyModel
from encinfer.he.params import CkksParams
from encinfer.inference.artifact import ModelArtifact, load_model
from encinfer.modelinfo import ModelDescription

log = logging.getLogger(__name__)

LAYOUTS = ("latency", "batch", "coeff")


@dataclass
class ServedModel:
    artifact: ModelArtifact
    latency: LatencyModel
    batch: BatchModel
    coeff: CoeffModel

    @classmethod
    def load(cls, path: str) -> ServedModel:
        artifact = load_model(path)
        served = cls(artifact=artifact,
                     latency=LatencyModel(artifact.weights, artifact.bias),
                     batch=BatchModel(artifact.weights, artifact.bias),
                     coeff=CoeffModel(artifact.weights, artifact.bias))
        for layout in LAYOUTS:  # expanded now, not on the first request of a key (it checks keys against it)
            common_a(served.params(layout))
        return served

    @property
    def name(self) -> str:
        return self.artifact.name

    def params(self, layout: str) -> CkksParams:
        return self.kernel(layout).layout.params

    @functools.cached_property
    def manifests(self) -> dict[str, str]:
        """Each layout's parameter hash, computed once: every request's key lookup uses it."""
        return {layout: self.params(layout).manifest_sha256() for layout in LAYOUTS}

    def kernel(self, layout: str) -> LatencyModel | BatchModel | CoeffModel:
        if layout == "latency":
            return self.latency
        if layout == "batch":
            return self.batch
        if layout == "coeff":
            return self.coeff
        raise InvalidArgument(f"unknown layout {layout!r}; this model accepts {', '.join(LAYOUTS)}")

    def describe(self) -> ModelDescription:
        """Everything GetModelInfo tells a client."""
        a = self.artifact
        return ModelDescription(
            name=a.name, version=a.version, kind=a.kind, sha256=a.sha256,
            n_features=int(a.weights.shape[1]), n_outputs=int(a.weights.shape[0]),
            class_labels=tuple(str(c) for c in a.classes),
            class_labels_dtype=a.metadata.get("classes_dtype", "str") if a.kind == "classifier" else "str",
            layouts={name: self.kernel(name).layout for name in LAYOUTS}, manifests=dict(self.manifests))


def load_catalog(paths: list[str] | tuple[str, ...]) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for path in paths:
        model = ServedModel.load(path)
        if model.name in models:
            raise ConfigError(f"two models are named {model.name!r}; names must be unique")
        models[model.name] = model
        log.info("model loaded", extra={"fields": {"model": model.name, "path": path}})
    return models


def find(models: dict[str, ServedModel], name: str) -> ServedModel:
    if not name:
        raise InvalidArgument("model name is empty; ListModels shows the served models")
    model = models.get(name)
    if model is None:
        raise NotFound(f"model {name!r} is not served here; served: {', '.join(sorted(models)) or 'none'}")
    return model
