"""Model cards: a net, its weights, how to feed it and what its classes are called.

A card is a small JSON file next to the prototxt (`model.json` for fcnify's
shipped models, `PREFIX_full_conv.json` for a converted one). It is what lets
`classify-map` get preprocessing and labels right without flags.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError
from .labels import Labels, check_labels, imagenet_labels, read_labels
from ..paths import models_dir, prototxt_dir
from .preprocess import IMAGENET_MEAN_BGR, Preprocess, default_preprocess  # noqa: F401 (re-exported)

IMAGENET = "imagenet"
# The card's truth that every output path carries (map JSON, text, Dask, info, convert, ONNX
# metadata): ModelCard.summary() is the one place it is put together.
CARD_FIELDS = ("name", "preprocess", "labels", "background_class", "box_head", "softmax")


@dataclass(frozen=True)
class ModelCard:
    """Everything fcnify knows about one model besides its layers."""

    name: str
    model_def: Path
    weights: Path | None
    preprocess: Preprocess
    labels: str | None = None  # "imagenet", a path, or None (class numbers)
    background_class: int | None = None
    fully_convolutional: bool = False
    card_path: Path | None = None
    # An output that regresses each cell's box: 4 values per cell, the offsets of
    # x0, y0, x1, y1 as fractions of the window's width and height (MTCNN's
    # encoding). --detect moves each box by them (fcnify.dense.detect).
    box_head: str | None = None
    # Whether the class map is probabilities: the net's own Softmax, or (for a net without
    # one) fcnify's over the classes; False maps the raw scores (caffe.geometry.softmax_plan).
    softmax: bool = True

    def load_labels(self, num_classes: int) -> Labels | None:
        if self.labels is None:
            return None
        if self.labels == IMAGENET:
            labels, where = imagenet_labels(), "fcnify's ImageNet labels"
        else:
            labels, where = read_labels(self.labels), self.labels
        check_labels(labels, num_classes, where)
        return labels

    def summary(self) -> dict:
        """CARD_FIELDS as JSON values: what a run of this card says about the model."""
        return {"name": self.name, "preprocess": self.preprocess.to_dict(), "labels": self.labels,
                "background_class": self.background_class, "box_head": self.box_head,
                "softmax": self.softmax}

    def describe(self) -> str:
        """The card's labels and detector fields in words (the text outputs' line)."""
        return (f"labels {self.labels or 'none (class numbers)'}; background class "
                f"{'none' if self.background_class is None else self.background_class}; box head "
                f"{self.box_head or 'none'}")

    def to_dict(self, relative_to: Path | None = None) -> dict:
        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            if relative_to is not None:
                try:
                    return str(Path(p).resolve().relative_to(relative_to.resolve()))
                except ValueError:
                    pass
            return str(Path(p).resolve())
        labels = self.labels
        if labels not in (None, IMAGENET):
            labels = rel(Path(labels))
        return {"name": self.name, "model_def": rel(self.model_def), "weights": rel(self.weights),
                "preprocess": self.preprocess.to_dict(), "labels": labels,
                "background_class": self.background_class,
                "fully_convolutional": self.fully_convolutional,
                "box_head": self.box_head, "softmax": self.softmax}


def read_card(path: str | Path) -> ModelCard:
    """Parse a model card; relative paths in it are relative to the card's folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read model card ({exc})", path) from exc
    if not isinstance(data, dict) or "model_def" not in data:
        raise InputError("not an fcnify model card (no model_def)", path)
    base = path.parent

    def resolve(value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else base / p

    labels = data.get("labels")
    if labels not in (None, IMAGENET):
        labels = str(resolve(labels))
    return ModelCard(
        name=data.get("name", path.stem),
        model_def=resolve(data["model_def"]),
        weights=resolve(data.get("weights")),
        preprocess=Preprocess.from_dict(data.get("preprocess", {}), path),
        labels=labels,
        background_class=check_background_class(data.get("background_class"), path),
        fully_convolutional=bool(data.get("fully_convolutional", False)),
        card_path=path,
        box_head=_box_head(data.get("box_head"), path),
        softmax=_softmax(data.get("softmax", True), path),
    )


def check_background_class(value, path: Path | None = None, classes: int | None = None) -> int | None:
    """A class number (0 or more) or None; below `classes` when the net's class count is known."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"background_class must be a class number (0 or more), not {value!r}", path)
    if classes is not None and value >= classes:
        raise InputError(f"background class {value} is not one of the net's {classes} classes", path)
    return value


def _box_head(value, path: Path) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise InputError(f"box_head must be the name of an output blob, not {value!r}", path)


def _softmax(value, path: Path) -> bool:
    if isinstance(value, bool):
        return value
    raise InputError(f"softmax must be true or false, not {value!r}", path)


def shipped_models() -> dict[str, Path]:
    """fcnify's own models: name -> card path (prototxt/<name>/model.json)."""
    root = prototxt_dir()
    return {p.parent.name: p for p in sorted(root.glob("*/model.json"))}


def find_model(name: str) -> ModelCard:
    """A shipped model by name.

    A card without weights (CaffeNet: 233 MB, not shipped) points at the
    models folder, where `fcnify fetch NAME` puts them.
    """
    cards = shipped_models()
    if name not in cards:
        raise InputError(f"unknown model '{name}'; fcnify ships: {', '.join(cards) or 'none'}")
    card = read_card(cards[name])
    if card.weights is None:
        card = replace(card, weights=fetched_weights(name))
    return card


def fetched_weights(name: str) -> Path:
    """Where `fcnify fetch NAME` puts a shipped model's weights."""
    from .fetch import MODELS
    folder = MODELS.get(name, name)
    return models_dir() / folder / f"{folder}.caffemodel"


GENERIC_STEMS = frozenset({"deploy", "model", "net", "train_val", "test"})


def model_name(model_def: Path, declared_name: str = "") -> str:
    """What to call a model in messages: the prototxt's `name:`, else its file or folder name.

    Zoo models are all called deploy.prototxt, so a generic file name gives
    way to the folder's name (bvlc_reference_caffenet, det2, ...).
    """
    if declared_name:
        return declared_name
    stem = model_def.stem
    if stem in GENERIC_STEMS and model_def.resolve().parent.name:
        return model_def.resolve().parent.name
    return stem


def default_card(model_def: Path, weights: Path | None, channels: int, num_classes: int | None,
                 name: str = "") -> ModelCard:
    """A card for a net that came without one: Caffe zoo conventions.

    3-channel input: BGR, 0-255, ImageNet per-channel mean; 1000 classes:
    ImageNet labels. 1-channel input: grey, 0-255, no mean. `name` is the
    prototxt's own `name:` (see model_name).
    """
    pre = default_preprocess(channels)
    labels = IMAGENET if num_classes == 1000 else None
    return ModelCard(model_name(model_def, name), model_def, weights, pre, labels)


def sibling_card(model_def: Path) -> Path | None:
    """The card that belongs to a prototxt, if one sits next to it."""
    for candidate in (model_def.with_suffix(".json"), model_def.parent / "model.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "model_def" in data:
                target = Path(data["model_def"])
                target = target if target.is_absolute() else candidate.parent / target
                if target.resolve() == model_def.resolve():
                    return candidate
    return None


def require_weights(card: ModelCard) -> Path:
    """The card's weights file, or one line saying how to get it."""
    from .fetch import MODELS
    from ..files import check_input_file
    if card.name in MODELS and card.card_path is not None and (
            card.weights is None or (Path(card.weights) == fetched_weights(card.name)
                                     and not Path(card.weights).exists())):
        raise InputError(f"weights for {card.name} not found at {card.weights}: run "
                         f"`fcnify fetch {card.name}` (downloads into {models_dir()}) or pass --weights")
    if card.weights is None:
        raise InputError(f"no weights for {card.name}: pass --weights")
    return check_input_file(card.weights, "weights (caffemodel)")
