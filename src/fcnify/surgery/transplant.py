"""Check weights against a net, and move them into the converted net.

Caffe copies weights by layer name: a shape mismatch aborts it, and a layer
whose name matches nothing silently keeps its random initial values. fcnify
checks both before Caffe runs, and reshapes each InnerProduct matrix into its
convolution kernel with explicit size checks (never a silent `.flat` copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..caffe.caffemodel import Weights, legacy_shape, shapes_match
from ..errors import ShapeMismatchError, WeightsError
from ..caffe.shapes import NetShapes, Shape, count
from .surgery import Surgery

BLOB_ROLES = {0: "weights", 1: "bias"}


@dataclass(frozen=True)
class Provenance:
    """Where one parameter blob of the new net came from."""

    layer: str
    index: int
    source_layer: str
    source_index: int
    source_shape: Shape
    shape: Shape
    transposed: bool = False


@dataclass
class WeightsCheck:
    """Result of matching a caffemodel to a net definition."""

    unused: list[str]  # layers in the caffemodel that the net does not have


def _describe(shapes: list[Shape]) -> str:
    return ", ".join(str(tuple(s)) for s in shapes) or "none"


def check_weights(shapes: NetShapes, weights: Weights, prototxt: Path | None = None) -> WeightsCheck:
    """Every parameterised layer must find blobs of the right count and shape by name."""
    wpath = weights.path
    wname = wpath.name if wpath else "the caffemodel"
    expected = shapes.params()
    missing = [name for name in expected if name not in weights]
    if missing:
        have = ", ".join(sorted(weights.layers)[:12])
        more = "" if len(weights.layers) <= 12 else f", ... ({len(weights.layers)} in all)"
        detail = "; ".join(f"'{n}' expects {_describe(expected[n])}" for n in missing[:6])
        raise WeightsError(f"{len(missing)} layer(s) of {prototxt.name if prototxt else 'the net'} "
                           f"get no weights from it (no layer of that name): {detail}. "
                           f"Its layers with weights: {have}{more}", wpath)
    for name, shapes_expected in expected.items():
        lw = weights[name]
        if len(lw.blobs) != len(shapes_expected):
            roles = " and ".join(BLOB_ROLES.get(i, f"blob {i}") for i in range(len(shapes_expected)))
            raise WeightsError(f"layer '{name}' expects {len(shapes_expected)} parameter blob(s) "
                               f"({roles}), {wname} has {len(lw.blobs)}", wpath)
        for i, (want, blob) in enumerate(zip(shapes_expected, lw.blobs)):
            if not shapes_match(want, blob, legacy=lw.legacy[i] if i < len(lw.legacy) else False):
                hint = ""
                # only the outputs differ: the same layer re-trained for another class count; a
                # kernel of other channels or size ((20,1,5,5) vs (32,3,5,5)) is another net
                if i in (0, 1) and len(want) == blob.ndim >= 1 and want[0] != blob.shape[0] \
                        and tuple(want[1:]) == tuple(blob.shape[1:]):
                    hint = " (a different num_output: fine-tuned for other classes?)"
                elif i == 0 and len(want) == blob.ndim and tuple(want[1:]) != tuple(blob.shape[1:]):
                    hint = " (another kernel size or input channel count: weights of a different net?)"
                raise ShapeMismatchError(
                    f"layer '{name}' {BLOB_ROLES.get(i, f'blob {i}')}: the net definition needs "
                    f"{tuple(want)}, {wname} has {tuple(blob.shape)}{hint}", wpath)
            if not np.isfinite(blob).all():
                bad = blob.size - int(np.count_nonzero(np.isfinite(blob)))
                raise WeightsError(f"layer '{name}' {BLOB_ROLES.get(i, f'blob {i}')}: {bad} of its "
                                   f"{blob.size} values are NaN or infinite", wpath)
    # Caffe copies blobs by layer name and aborts when a layer that takes none is given some.
    surplus = [ls.name for ls in shapes.layers if not ls.params and ls.name in weights]
    if surplus:
        listed = ", ".join(f"'{n}' ({weights[n].type or 'no type'}, {len(weights[n].blobs)} blob(s))"
                           for n in surplus[:6])
        raise WeightsError(f"carries parameter blobs for layer(s) of "
                           f"{prototxt.name if prototxt else 'the net'} that take none: {listed}; "
                           "Caffe refuses to load that (rename or remove them)", wpath)
    unused = [n for n in weights.layers if n not in expected]
    return WeightsCheck(unused)


def _as_shape(blob: np.ndarray, want: Shape, *, legacy: bool) -> np.ndarray:
    """A stored blob viewed in its declared shape (legacy 4-axis blobs squeezed)."""
    if tuple(blob.shape) == tuple(want):
        return blob
    if legacy and legacy_shape(tuple(want)) == tuple(blob.shape):
        return blob.reshape(want)
    raise ShapeMismatchError(f"blob of shape {tuple(blob.shape)} cannot stand for {tuple(want)}")


def transplant(surgery: Surgery, weights: Weights, checked: WeightsCheck | None = None
               ) -> tuple[dict[str, list[np.ndarray]], list[Provenance]]:
    """Parameter arrays for every layer of the converted net, and where each came from.

    `checked` is the result of check_weights on these weights, when the caller
    already has it; otherwise the weights are checked here first.
    """
    if checked is None:
        check_weights(surgery.original_shapes, weights, surgery.original.path)
    converted = {c.new_layer: c for c in surgery.converted()}
    old_params = surgery.original_shapes.params()
    out: dict[str, list[np.ndarray]] = {}
    provenance: list[Provenance] = []
    for ls in surgery.shapes.layers:
        if not ls.params:
            continue
        src = surgery.source_layer.get(ls.name)
        if src is None or src not in weights:
            raise WeightsError(f"converted layer '{ls.name}' has no source of weights")
        lw = weights[src]
        arrays = []
        for i, new_shape in enumerate(ls.params):
            blob = _as_shape(lw.blobs[i], old_params[src][i], legacy=lw.legacy[i])
            transposed = False
            if ls.name in converted and i == 0:
                conv = converted[ls.name]
                if conv.transpose:
                    blob = blob.T
                    transposed = True
                n_out = new_shape[0]
                if blob.shape != (n_out, count(new_shape[1:])):
                    raise ShapeMismatchError(
                        f"cannot turn '{src}' weights {tuple(lw.blobs[i].shape)} into '{ls.name}' "
                        f"kernels {tuple(new_shape)}: sizes differ")
                blob = np.ascontiguousarray(blob).reshape(new_shape)
            elif tuple(blob.shape) != tuple(new_shape):
                raise ShapeMismatchError(f"'{src}' blob {i} {tuple(blob.shape)} does not fit "
                                         f"'{ls.name}' {tuple(new_shape)}")
            arrays.append(np.ascontiguousarray(blob, dtype=np.float32))
            provenance.append(Provenance(ls.name, i, src, i, tuple(lw.blobs[i].shape),
                                         tuple(new_shape), transposed))
        out[ls.name] = arrays
    needing = {ls.name for ls in surgery.shapes.layers if ls.params}
    if set(out) != needing:
        raise WeightsError(f"layers left without weights: {sorted(needing - set(out))}")
    return out, provenance
