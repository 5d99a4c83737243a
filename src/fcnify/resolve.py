"""Which model card a run uses: explicit arguments, then the model's card, then defaults.

Every command and API call that takes a model goes through `resolve_card`,
so the order is the same everywhere and written once (as timm's
resolve_pretrained_cfg / resolve_data_config do for its models):

1. The net comes from exactly one source: a shipped model's name or a card's
   path (`model`), a card (`card`), or a prototxt (`model_def`, with
   `weights`). Naming it twice is refused (ArgumentError), never silently
   settled: a card's prototxt and another prototxt cannot both be the net.
   None of them: CaffeNet.
2. What the source says: the card's weights, preprocessing and labels; for a
   prototxt, the card beside it, else Caffe's model-zoo defaults
   (`card_for_model_def`).
3. Explicit arguments win field by field: `weights`, `preprocess` (a whole
   Preprocess), then the preprocessing terms given in `overrides` (one
   io.preprocess.PreprocessOverrides: channels, raw_scale, input_scale, mean,
   transpose), and `labels`; for detection, `background_class` and
   `box_head`; `softmax`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .caffe.geometry import score_blob
from .caffe.netdef import read_netdef
from .caffe.shapes import infer_partial, input_shapes
from .errors import ArgumentError
from .io.labels import read_labels
from .io.models import (IMAGENET, ModelCard, check_background_class, default_card, find_model,
                        read_card, sibling_card)
from .io.preprocess import Preprocess, PreprocessOverrides
from .surgery.surgery import needs_surgery

DEFAULT_MODEL = "caffenet"


def resolve_card(model: str | Path | ModelCard | None = None, *,
                 model_def: str | Path | None = None, weights: str | Path | None = None,
                 card: str | Path | ModelCard | None = None,
                 preprocess: Preprocess | None = None, overrides: PreprocessOverrides | None = None,
                 labels: str | Path | None = None, background_class: int | None = None,
                 box_head: str | None = None, softmax: bool | None = None) -> ModelCard:
    """The card to run: the net from one source, its card's settings, explicit arguments over them.

    `model` is a shipped model's name, a card's path, or a ModelCard; `card`
    a card's path or a ModelCard; `model_def` a prototxt, which needs
    `weights`. Giving more than one of them raises ArgumentError (exit 2).
    `overrides` holds the preprocessing terms given (None: none).
    `labels` is a labels file (checked here) or "imagenet". `background_class`
    (the class that means "nothing here") and `box_head` (an output that
    regresses each cell's box) are what --detect reads; `softmax` whether the class map is
    probabilities (None: the card's). Files named are
    not read beyond what choosing needs: the weights are checked by
    io.models.require_weights, where a command needs them.
    """
    found = source_card(model, model_def=model_def, weights=weights, card=card)
    if weights is not None:
        found = replace(found, weights=Path(weights))
    found = replace(found, preprocess=(overrides or PreprocessOverrides()).apply(
        preprocess or found.preprocess))
    if labels is not None:
        if str(labels) != IMAGENET:
            read_labels(labels)  # a bad file is refused now, not after the net is loaded
        found = replace(found, labels=str(labels))
    if background_class is not None:
        found = replace(found, background_class=check_background_class(background_class))
    if box_head is not None:
        found = replace(found, box_head=box_head)
    if softmax is not None:
        found = replace(found, softmax=softmax)
    return found


def source_card(model: str | Path | ModelCard | None = None, *, model_def: str | Path | None = None,
                weights: str | Path | None = None,
                card: str | Path | ModelCard | None = None) -> ModelCard:
    """The card of the one source that names the net, before explicit arguments are applied."""
    given = [name for name, value in (("model", model), ("card", card), ("model_def", model_def))
             if value is not None]
    if len(given) > 1:
        raise ArgumentError("{%s} and {%s} both name the net: give one (weights, labels and "
                            "preprocessing given beside it override its card's)" % tuple(given[:2]),
                            *given[:2])
    if card is not None:
        return card if isinstance(card, ModelCard) else read_card(card)
    if isinstance(model, ModelCard):
        return model
    if model is not None and is_card_path(model):
        return read_card(model)
    if model_def is not None:
        if weights is None:
            raise ArgumentError("{model_def} needs {weights}", "model_def", "weights")
        return card_for_model_def(Path(model_def), Path(weights))
    return find_model(model or DEFAULT_MODEL)


def is_card_path(model: str | Path) -> bool:
    """Whether a model name is a card file's path rather than a shipped model."""
    return str(model).endswith(".json") or Path(model).is_file()


def card_for_model_def(model_def: Path, weights: Path | None) -> ModelCard:
    """A card for a prototxt: the one next to it, else Caffe's model-zoo defaults.

    A net without InnerProduct layers or a pooling that collapses the map
    counts as already fully convolutional.
    """
    sib = sibling_card(model_def)
    if sib is not None:
        return replace(read_card(sib), model_def=model_def, weights=weights)
    netdef = read_netdef(model_def)
    declared = input_shapes(netdef.param)
    channels = next(iter(declared.values()))[1] if declared else 3
    shapes = infer_partial(netdef.param, path=model_def)
    out = shapes.blobs.get(score_blob(netdef.param))
    classes = out[1] if out and len(out) >= 2 else None
    card = default_card(model_def, weights, channels, classes, netdef.param.name)
    return replace(card, fully_convolutional=not needs_surgery(netdef.param, shapes))
