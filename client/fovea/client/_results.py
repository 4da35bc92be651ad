"""Plain result types returned by the clients (no protobuf leaks into the public API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fovea.v1 import classifier_pb2


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    return value


def _to_dict(result: Any) -> dict[str, Any]:
    """A result dataclass as a dict of plain values, its tuples as lists (JSON's arrays)."""
    return _lists(asdict(result))


@dataclass(frozen=True)
class Classification:
    """One label of a prediction.

    Attributes:
        index: The class index (row of the model's ``labels.txt``, counted from 0).
        label: The class label.
        score: The softmax probability of the class, 0..1.
    """

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """The result for one input image.

    Attributes:
        top: The top-k classes, highest score first.
        probabilities: Every class probability in index order, or ``None`` unless
            ``return_probabilities=True`` was asked.
        model_name: The model that computed this prediction.
        model_version: The concrete model version that computed it.
        source: Where the image came from: its file path, or a name such as ``<array 0>`` or
            ``<bytes 2>`` for in-memory inputs.
        abstained: True when a threshold was asked for (``min_score`` or ``use_model_threshold``)
            and the top score is below it: the model is not sure.
    """

    top: tuple[Classification, ...]
    probabilities: tuple[float, ...] | None
    model_name: str
    model_version: int
    source: str
    abstained: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``fovea predict --json`` prints)."""
        out = _to_dict(self)
        if self.probabilities is None:
            del out["probabilities"]
        return out


@dataclass(frozen=True)
class ModelMetadata:
    """What a server reports about one model version (``GetModelMetadata``).

    Attributes:
        name: The model name.
        version: The concrete version described.
        labels: The class labels in index order.
        input_height: The input height in pixels the model was trained at.
        input_width: The input width in pixels the model was trained at.
        backbone: The backbone network, e.g. ``resnet50``.
        loaded_versions: Every version of the model the server has loaded, ascending.
        metrics: Evaluation metrics recorded at training time, e.g. ``test_accuracy``.
        created_at: When the version was exported (RFC 3339).
        max_images_per_request: The most images the server accepts in one request (0 if unknown).
        version_labels: The model's version labels (its rollout.json), label -> version.
    """

    name: str
    version: int
    labels: tuple[str, ...]
    input_height: int
    input_width: int
    backbone: str
    loaded_versions: tuple[int, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    max_images_per_request: int = 0
    version_labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True)
class ModelStatus:
    """One model a server knows (``ListModels``).

    Attributes:
        name: The model name.
        versions: The versions loaded and serving, ascending.
        ready: Whether at least one version is loaded and warm.
        version_labels: The model's version labels (its rollout.json), label -> version.
    """

    name: str
    versions: tuple[int, ...]
    ready: bool
    version_labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def predictions_from_response(
    response: classifier_pb2.PredictResponse, sources: list[str], return_probabilities: bool
) -> list[Prediction]:
    name, version = response.model_spec.name, int(response.model_spec.version)
    return [
        Prediction(
            top=tuple(Classification(int(c.index), c.label, float(c.score)) for c in p.top),
            probabilities=tuple(float(x) for x in p.probabilities) if return_probabilities else None,
            model_name=name,
            model_version=version,
            source=source,
            abstained=bool(p.abstained),
        )
        for p, source in zip(response.predictions, sources, strict=True)
    ]


def metadata_from_response(response: classifier_pb2.GetModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        name=response.model_spec.name,
        version=int(response.model_spec.version),
        labels=tuple(response.labels),
        input_height=int(response.input_height),
        input_width=int(response.input_width),
        backbone=response.backbone,
        loaded_versions=tuple(int(v) for v in response.loaded_versions),
        metrics={k: float(v) for k, v in sorted(response.metrics.items())},
        created_at=response.created_at,
        max_images_per_request=int(response.max_images_per_request),
        version_labels={k: int(v) for k, v in sorted(response.version_labels.items())},
    )


def models_from_response(response: classifier_pb2.ListModelsResponse) -> list[ModelStatus]:
    return [
        ModelStatus(
            m.name,
            tuple(int(v) for v in m.versions),
            bool(m.ready),
            {k: int(v) for k, v in sorted(m.version_labels.items())},
        )
        for m in response.models
    ]
