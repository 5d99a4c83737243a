"""Can this fully-convolutional net be that original's conversion? Decided before Caffe runs.

`fcnify verify` runs both nets on the same inputs. Two nets that do not
correspond (another model's FCN, another input, other layer widths) would
make Caffe abort on a failed CHECK, or compare numbers that mean nothing.
This module compares what the files say: the image input, the parameter
layers and their shapes (the original's as fcnify's surgery would convert
them), and the outputs' sizes at the original's input size. The numeric
comparison itself stays in verify.py.
"""
from __future__ import annotations

from ..errors import NetDefinitionError
from ..caffe.geometry import output_blobs, score_blob
from ..caffe.netdef import NetDef
from ..caffe.shapes import NetShapes, Shape, count, image_input, infer
from .surgery import Surgery


def _shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _shapes(shapes: list[Shape]) -> str:
    return ", ".join(_shape(s) for s in shapes)


def check_correspondence(original: NetDef, fcn: NetDef, surgery: Surgery) -> None:
    """Raise NetDefinitionError (naming both files) unless `fcn` can be `original` converted.

    `surgery` is fcnify's own conversion of `original`: a converted
    InnerProduct is compared with the convolution it becomes.
    """
    blob, shape = _check_inputs(original, fcn)
    expected = surgery.shapes if surgery.changed else surgery.original_shapes
    # parameter shapes do not depend on the input size: the FCN's own declared input will do
    _check_params(original, fcn, expected, infer(fcn.param, path=fcn.path), surgery)
    _check_outputs(original, fcn, surgery.original_shapes, _fcn_shapes(original, fcn, blob, shape))


def _fail(original: NetDef, fcn: NetDef, what: str) -> None:
    raise NetDefinitionError(f"does not correspond to {original.path}: {what}; "
                             "is it that net's conversion?", fcn.path)


def _check_inputs(original: NetDef, fcn: NetDef) -> tuple[str, Shape]:
    """Both nets take the same image blob with the same channels."""
    name, shape = image_input(original.param, original.path)
    fcn_name, fcn_shape = image_input(fcn.param, fcn.path)
    if fcn_name != name:
        _fail(original, fcn, f"its image input is '{fcn_name}', the original's is '{name}'")
    if fcn_shape[1] != shape[1]:
        _fail(original, fcn, f"input '{name}' has {fcn_shape[1]} channel(s), "
                             f"the original's has {shape[1]}")
    return name, shape


def _fcn_shapes(original: NetDef, fcn: NetDef, blob: str, shape: Shape) -> NetShapes:
    """The FCN's shapes at the original's input size, where verify runs it."""
    try:
        return infer(fcn.param, {blob: (1,) + tuple(shape[1:])}, path=fcn.path)
    except NetDefinitionError as exc:
        _fail(original, fcn, f"it cannot run at the original's input size "
                             f"{shape[3]}x{shape[2]} (width x height): {exc.message}")
        raise  # unreachable: _fail raises


def _check_params(original: NetDef, fcn: NetDef, expected: NetShapes, actual: NetShapes,
                  surgery: Surgery) -> None:
    """Layer for layer, the same parameter shapes: by name where the names agree, else in order.

    Layers of the same name are compared first, so two different nets that
    share layer names (MTCNN's R-Net and O-Net) are told apart by the first
    layer whose shapes differ.
    """
    want, have = expected.params(), actual.params()
    source = surgery.source_layer if surgery.changed else {}
    for name in (n for n in want if n in have):
        _compare(original, fcn, name, want[name], name, have[name], source, strict=True)
    missing = [n for n in want if n not in have]
    if not missing:
        return
    if len(want) != len(have):
        _fail(original, fcn, f"the original has {len(want)} layers with parameters, this net "
                             f"{len(have)}; no layer here for "
                             + ", ".join(f"'{source.get(m, m)}'" for m in missing[:4]))
    for mine, theirs in zip(want, have):  # a hand-made FCN may name its layers otherwise
        _compare(original, fcn, mine, want[mine], theirs, have[theirs], source, strict=False)


def _compare(original: NetDef, fcn: NetDef, mine: str, a: list[Shape], theirs: str, b: list[Shape],
             source: dict[str, str], strict: bool) -> None:
    """Equal shapes; paired by order, equal sizes will do (a matrix laid out as another kernel)."""
    same = [tuple(x) for x in a] == [tuple(y) for y in b]
    if not same and not strict:
        same = len(a) == len(b) and all(count(x) == count(y) for x, y in zip(a, b))
    if not same:
        label = source.get(mine, mine)
        as_converted = " (as converted)" if label != mine else ""
        _fail(original, fcn, f"layer '{label}' has parameters {_shapes(a)}{as_converted}, "
                             f"its counterpart '{theirs}' here has {_shapes(b)}")


def _check_outputs(original: NetDef, fcn: NetDef, expected: NetShapes, actual: NetShapes) -> None:
    """The scores and the output hold as many values per image as the original's."""
    for role, pick in (("scores", score_blob), ("output", lambda net: output_blobs(net)[-1])):
        a, b = pick(original.param), pick(fcn.param)
        na, nb = count(expected.blobs[a][1:]), count(actual.blobs[b][1:])
        if na != nb:
            _fail(original, fcn, f"its {role} '{b}' holds {nb} values per image at the original's "
                                 f"input size, the original's '{a}' {na}")
