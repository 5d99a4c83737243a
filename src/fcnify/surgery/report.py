"""Plain-text reports for convert, verify and info."""
from __future__ import annotations

import math
from pathlib import Path

from ..caffe.geometry import blob_geometry, hw, map_geometry, map_size, score_blob, smallest_input
from .bound import LAMBDA
from ..caffe.netdef import read_netdef
from ..caffe.planner import estimate, format_bytes
from ..caffe.shapes import image_input, infer, infer_partial
from .surgery import convert_net, needs_surgery


def _shape(s) -> str:
    return "x".join(str(d) for d in s)


def geometry_lines(geo, minimum, declared) -> list[str]:
    sy, sx = geo.stride
    fy, fx = geo.field
    lines = [f"  stride:          {sx} px" + ("" if sx == sy else f" (x), {sy} px (y)"),
             f"  window per cell: {hw(fy, fx)} px at offset (y {geo.offset[0]}, x "
             f"{geo.offset[1]}) — the crop the classifier would be given for cell (r, c): "
             f"x in [c*{sx}{geo.offset[1]:+d}, +{fx}), y likewise",
             f"  reach per cell:  {hw(*geo.reach)} px, x from {geo.x.reach_lo:+d} to "
             f"{geo.x.reach_hi:+d} around the window's start — every pixel that can change the "
             "cell (padding included)",
             f"  smallest input giving one cell: {hw(*minimum)} px (Caffe's ceil-rounded "
             f"pooling lets windows hang over the edge); fcnify asks for at least "
             f"{hw(min(fy, declared[2]), min(fx, declared[3]))} px",
             "  sizes that tile exactly: " + ", ".join(f"{w}" for _, w in geo.exact_sizes(6))
             + f", ... ({fx} + {sx}k)"]
    return lines


def conversion_report(result) -> str:
    s = result.surgery
    lines = [f"{'converted' if s.changed else 'nothing to convert in'} {s.original.path} "
             f"({len(s.original.param.layer)} layers"
             + (f", upgraded from {s.original.upgraded_from}" if s.original.upgraded_from else "") + ")"]
    if not s.changed:
        lines.append("  no InnerProduct layer and no pooling that collapses the map: the net is already "
                     "fully convolutional; its card points at its own prototxt and caffemodel")
    for c in s.conversions:
        if c.kind == "inner_product":
            old = ", ".join(_shape(p) for p in c.old_params)
            new = ", ".join(_shape(p) for p in c.new_params)
            t = " (transposed)" if c.transpose else ""
            lines.append(f"  {c.layer} InnerProduct [{old}] -> {c.new_layer} Convolution [{new}]{t}: {c.detail}")
        elif c.kind == "removed":
            lines.append(f"  {c.layer} {c.old_type} removed: {c.detail}")
        else:
            lines.append(f"  {c.layer}: {c.detail}")
    lines.append(f"preprocessing (written into the card): {result.card.preprocess.describe()}")
    lines.append("card: " + result.card.describe())
    if result.unused_source_layers:
        lines.append("  weights not used (no layer of that name in the net): "
                     + ", ".join(result.unused_source_layers))
    if result.geometry is not None:
        _, declared = image_input(s.original.param)
        lines.append("map geometry:")
        lines += geometry_lines(result.geometry, result.minimum_input, declared)
        for n in (declared[2] + 7 * result.geometry.y.stride,):
            rows, cols = map_size(s.net, n, n)
            lines.append(f"  e.g. a {n}x{n} input gives a {rows}x{cols} map")
    if result.report is not None:
        lines.append(verify_report(result.report))
    if result.outputs:
        lines.append("wrote " + ", ".join(str(p) for p in result.outputs.values()))
    return "\n".join(lines)


def verify_report(report) -> str:
    from .verify import SATURATED, TOP_K
    lines = [f"equivalence check at input {_shape(report.input_shape)} on {len(report.inputs)} inputs "
             f"({'; '.join(report.inputs)}):"]
    for c in report.comparisons:
        same = "same" if c.top1_agree and c.topk_agree else "DIFFERENT"
        ranked = "top-1" if 0 < c.classes <= TOP_K else f"top-1 and top-{TOP_K}"  # 2 classes: no top-5
        ranks = f"{ranked} {same} ({c.near_ties} near-ties, {c.near_ties_excused} excused)"
        lines.append(f"  {c.original} vs {c.converted} ({c.kind}): largest difference {c.max_abs:.3g}, "
                     f"bound there {c.bound:.3g}: {c.fraction:.3g} of the bound"
                     f" [{c.worst_input}, index {c.worst_index}]; {ranks}")
    if report.accumulation_length:
        lines.append(f"  bound: |ds| <= 2*{LAMBDA:g}*sqrt(N)*u*(|W||x|+|b|) per score, u = 2^-24, "
                     f"N = {report.accumulation_length} terms summed on the way (docs/verify.md)")
    if report.top_probability:
        tops = report.top_probability
        lines.append(f"  inputs' top probability: {min(tops):.4g} to {max(tops):.4g}"
                     + (f"; EVERY input saturated (> {SATURATED}): the probabilities hide differences"
                        if report.saturated else ""))
    sampled = len(report.top_probability) - len(report.added_for_saturation)
    saturated = sum(p > SATURATED for p in report.top_probability[:sampled])
    if saturated:
        lines.append(f"  {'all ' if saturated == sampled else ''}{saturated} of {sampled} sample inputs "
                     f"saturated (top probability > {SATURATED}); checked scaled down too: "
                     + ("; ".join(report.added_for_saturation) or "none found that spreads"))
    if report.params_checked:
        bad = report.params_mismatched
        lines.append(f"  parameters read back from the engine: {report.params_checked - len(bad)}/"
                     f"{report.params_checked} identical to the transplanted weights"
                     + (f"; mismatched: {', '.join(bad)}" if bad else ""))
    lines.append("  result: " + ("EQUIVALENT" if report.equivalent else "NOT EQUIVALENT"))
    return "\n".join(lines)


def preprocess_line(path: Path, declared) -> str:
    """What the net's card (or, without one, Caffe's defaults) does to an image's pixels."""
    from ..io.models import read_card, sibling_card
    from ..io.preprocess import default_preprocess
    card = sibling_card(path)
    if card is not None:
        return f"preprocessing (from {card}): {read_card(card).preprocess.describe()}"
    pre = default_preprocess(declared[1] if len(declared) == 4 else 3)
    return (f"preprocessing (no card next to the net, Caffe's defaults; convert's --channels, "
            f"--raw-scale, --mean, --input-scale, --transpose change it): {pre.describe()}")


def net_info(path: Path, size: tuple[int, int] | None) -> str:
    netdef = read_netdef(path)
    net = netdef.param
    name, declared = image_input(net, path)
    h, w = size or (declared[2], declared[3])
    has_ip = needs_surgery(net, infer_partial(net, path=path))
    surgery = convert_net(netdef) if has_ip else None
    fcn = surgery.net if surgery is not None else net
    shown = fcn if size else net
    # one image (batch 1) throughout, whatever batch the prototxt declares: the memory line is for one too
    shapes = infer(shown, {name: (1,) + tuple(declared[1:2]) + (h, w)} if len(declared) == 4 else None,
                   path=path)
    lines = [f"{path}: {netdef.name}, {len(net.layer)} layers"
             + (f" (upgraded from {netdef.upgraded_from})" if netdef.upgraded_from else "")
             + ("" if has_ip else ", fully convolutional (no InnerProduct) with no pooling "
                                  "that collapses the map"),
             f"blob shapes for one image (batch 1) at input {hw(h, w)} (height x width)"
             + (f", not the prototxt's batch of {declared[0]}" if declared[0] != 1 else "")
             + (" (fully-convolutional version)" if has_ip and size else "") + ":"]
    lines.insert(1, preprocess_line(path, declared))
    if surgery is not None:
        lines.insert(2, "surgery that convert (and classify-map, in memory) applies:")
        for i, c in enumerate(surgery.conversions):
            what = (f"{c.layer} InnerProduct -> {c.new_layer} Convolution: {c.detail}"
                    if c.kind == "inner_product" else f"{c.layer}: {c.detail}")
            lines.insert(3 + i, "  " + what)
    geos = blob_geometry(shown, path=path)
    for ls in shapes.layers:
        for top, shape in zip([l for l in shown.layer if l.name == ls.name][0].top, ls.tops):
            g = geos.get(top)
            extra = f"  stride {g.stride[1]}, reach {g.x.reach}" if g and ls.type != "Input" else ""
            lines.append(f"  {ls.name:<28} {ls.type:<14} {top:<28} {_shape(shape)}{extra}")
    score = score_blob(fcn)
    try:
        geo = map_geometry(fcn, score, path=path)
    except Exception as exc:  # a net whose output is not spatial even after conversion
        lines.append(f"no dense map: {exc}")
        return "\n".join(lines)
    lines.append(f"dense map ({score}" + (", after the surgery above" if has_ip else "") + "):")
    lines += geometry_lines(geo, smallest_input(fcn, score), declared)
    rows, cols = map_size(fcn, h, w, score)
    est = estimate(fcn, h, w)
    lines.append(f"  at {hw(h, w)}: {rows}x{cols} cells; for one image (batch 1) Caffe needs about "
                 f"{format_bytes(est.total)} "
                 f"(activations {format_bytes(est.activations)}, weights {format_bytes(est.params)}; "
                 f"largest blob {est.largest_blob_name}: {est.largest_blob:,} values)")
    return "\n".join(lines)


# ------------------------------------------------------------------ JSON (--format json)

def info_card(path: Path, declared, net):
    """The card `info` describes: the one beside the net, else Caffe's defaults for it."""
    from ..io.models import default_card, read_card, sibling_card
    found = sibling_card(path)
    if found is not None:
        return read_card(found)
    shapes = infer_partial(net, path=path).blobs.get(score_blob(net))
    return default_card(path, None, declared[1] if len(declared) == 4 else 3,
                        shapes[1] if shapes and len(shapes) >= 2 else None, net.name)


def net_document(path: Path, size: tuple[int, int] | None) -> dict:
    """`info --format json`: the card's fields (as every output path gives them), the surgery,
    the map's geometry and size, and each layer's blob shapes for one image."""
    from ..caffe.geometry import output_blobs, softmax_plan
    netdef = read_netdef(path)
    net = netdef.param
    _, declared = image_input(net, path)
    h, w = size or (declared[2], declared[3])
    has_ip = needs_surgery(net, infer_partial(net, path=path))
    surgery = convert_net(netdef) if has_ip else None
    fcn = surgery.net if surgery is not None else net
    card = info_card(path, declared, net)
    shown = fcn if size else net
    shapes = infer(shown, {image_input(shown)[0]: (1,) + tuple(declared[1:2]) + (h, w)}
                   if len(declared) == 4 else None, path=path)
    tops = {l.name: list(l.top) for l in shown.layer}
    doc = {"net": str(path), "name": netdef.name, "upgraded_from": netdef.upgraded_from,
           "model": card.summary(), "input_size": [h, w],
           "surgery": [c.__dict__ | {"old_params": [list(p) for p in c.old_params],
                                     "new_params": [list(p) for p in c.new_params]}
                       for c in (surgery.conversions if surgery is not None else [])],
           "layers": [{"name": ls.name, "type": ls.type, "top": top, "shape": list(shape)}
                      for ls in shapes.layers for top, shape in zip(tops[ls.name], ls.tops)],
           "map": None}
    try:
        geo = map_geometry(fcn, score_blob(fcn), path=path)
    except Exception as exc:  # a net whose output is not spatial even after conversion
        return json_safe(doc | {"map_problem": str(exc)})
    rows, cols = map_size(fcn, h, w, score_blob(fcn))
    classes = infer_partial(fcn, path=path).blobs[score_blob(fcn)][1]
    doc["map"] = {"rows": rows, "cols": cols, "classes": classes, "stride_px": list(geo.stride),
                  "window_px": list(geo.window), "reach_px": list(geo.reach), "offset_px": list(geo.offset),
                  "reach_offset_px": [geo.y.reach_lo, geo.x.reach_lo], "output": output_blobs(fcn)[-1],
                  "softmax": softmax_plan(fcn, None, card.softmax).to_dict(),
                  "minimum_input": list(smallest_input(fcn, score_blob(fcn)))}
    return json_safe(doc)


def json_safe(value):
    """`value` with infinities and NaN as strings ("inf", "-inf", "nan"): strict JSON, still readable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def verify_document(report, original: Path, fcn: Path) -> dict:
    """The whole verify report as one JSON-ready document."""
    return json_safe({"original": str(original), "fcn": str(fcn)} | report.to_dict())


def conversion_document(result, seconds: float | None = None) -> dict:
    """The whole convert report (layers, geometry, verification, files) as one JSON-ready document."""
    s = result.surgery
    doc = {"model_def": str(s.original.path), "upgraded_from": s.original.upgraded_from,
           "changed": result.changed,
           "conversions": [c.__dict__ | {"old_params": [list(p) for p in c.old_params],
                                         "new_params": [list(p) for p in c.new_params]}
                           for c in s.conversions],
           "unused_source_layers": list(result.unused_source_layers),
           "card": result.card.summary(),
           "geometry": result.geometry.to_dict() if result.geometry else None,
           "minimum_input": list(result.minimum_input) if result.minimum_input else None,
           "equivalent": result.equivalent,
           "verification": result.report.to_dict() if result.report is not None else None,
           "outputs": {k: str(p) for k, p in result.outputs.items()}}
    if seconds is not None:
        doc["seconds"] = round(seconds, 3)
    return json_safe(doc)
