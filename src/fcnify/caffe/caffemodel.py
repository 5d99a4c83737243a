"""Read and write .caffemodel weights without pycaffe, fast and with checks.

A caffemodel is a binary NetParameter whose layers carry BlobProtos. The
parameter data (tens of millions of floats) is read straight from the packed
protobuf field into numpy, and written the same way, instead of going through
protobuf's per-element Python containers. Everything else in a layer is
parsed by protobuf. Truncated or foreign files are reported by name and byte
offset instead of aborting Caffe.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import WeightsError
from ..files import read_bytes, sniff
from .netdef import V1_TYPES
from .proto import caffe_pb2

Shape = tuple[int, ...]

# Field numbers in caffe.proto.
NET_LAYER, NET_LAYERS = 100, 2
LAYER_BLOBS = 7
V1_BLOBS, V1_V0LAYER = 6, 1
V0_BLOBS = 50
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH = 1, 2, 3, 4
BLOB_DATA, BLOB_DIFF, BLOB_SHAPE, BLOB_DOUBLE_DATA, BLOB_DOUBLE_DIFF = 5, 6, 7, 8, 9
READ_LIMIT = 2**31 - 1  # Caffe's kProtoReadBytesLimit (INT_MAX bytes)


@dataclass
class LayerWeights:
    """One layer's parameter blobs, in order."""

    name: str
    type: str
    blobs: list[np.ndarray]
    legacy: list[bool] = field(default_factory=list)  # blob had num/channels/height/width dims


@dataclass
class Weights:
    """All layers of a caffemodel that carry parameters, by layer name."""

    layers: dict[str, LayerWeights]
    path: Path | None = None
    format: str = "V2"  # "V1" for old `layers` files

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> LayerWeights:
        return self.layers[name]


FIXED_WIDTH = {1: 8, 5: 4}  # protobuf wire types of 64- and 32-bit fields, in bytes


class _Reader:
    """Protobuf wire-format walker over a bytes buffer, with bounds checks."""

    def __init__(self, buf: memoryview, base: int, path: Path | None) -> None:
        self.buf, self.base, self.path = buf, base, path

    def fail(self, pos: int, what: str) -> None:
        raise WeightsError(f"{what} at byte {self.base + pos} (file is "
                           f"{self.base + len(self.buf)} bytes)", self.path)

    def varint(self, pos: int) -> tuple[int, int]:
        result = shift = 0
        buf = self.buf
        while True:
            if pos >= len(buf):
                self.fail(pos, "truncated: a number runs past the end")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                self.fail(pos, "not a caffemodel: malformed varint")

    def fields(self) -> Iterator[tuple[int, int, int, int]]:
        """Yield (field number, wire type, start, end) of each field's payload."""
        pos, end = 0, len(self.buf)
        while pos < end:
            key, pos = self.varint(pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                self.fail(pos, "not a caffemodel: field number 0")
            if wire == 0:
                _, new = self.varint(pos)
            elif wire in FIXED_WIDTH:
                new = pos + FIXED_WIDTH[wire]
                if new > end:
                    self.fail(pos, f"truncated: a {8 * FIXED_WIDTH[wire]}-bit field runs past the end")
            elif wire == 2:
                length, pos = self.varint(pos)
                new = pos + length
                if new > end:
                    self.fail(pos, f"truncated: a {length}-byte field runs past the end")
            else:
                self.fail(pos, f"not a caffemodel: invalid protobuf wire type {wire}")
            yield number, wire, pos, new
            pos = new

    def sub(self, start: int, end: int) -> "_Reader":
        return _Reader(self.buf[start:end], self.base + start, self.path)


def read_weights(path: str | Path) -> Weights:
    """Parse a .caffemodel file into per-layer numpy arrays."""
    path = Path(path)
    data = read_bytes(path, "weights (caffemodel)")
    return parse_weights(data, path)


def parse_weights(data: bytes, path: Path | None = None) -> Weights:
    kind = sniff(data)
    if kind == "an HDF5 file":
        raise WeightsError("HDF5 weights are not supported; save the net as a binary .caffemodel", path)
    if kind:
        raise WeightsError(f"this is {kind}, not a caffemodel", path)
    if _looks_like_text(data):
        raise WeightsError("this is a text file (a prototxt?), not a binary caffemodel; "
                           "pass the net definition with --model-def", path)
    if len(data) > READ_LIMIT:
        raise WeightsError(f"is {len(data):,} bytes; Caffe reads at most {READ_LIMIT:,} "
                           "(2 GB) of a caffemodel", path)
    reader = _Reader(memoryview(data), 0, path)
    layers: dict[str, LayerWeights] = {}
    fmt = "V2"
    seen_layer_field = False
    seen = set()
    header = bytearray()
    for number, wire, start, end in reader.fields():
        if number not in (NET_LAYER, NET_LAYERS) or wire != 2:
            header += _field_bytes(reader, number, wire, start, end)
            continue
        seen_layer_field = True
        seen.add(number)
        sub = reader.sub(start, end)
        if number == NET_LAYER:
            lw = _parse_layer(sub, v1=False)
        else:
            fmt = "V1"
            lw = _parse_layer(sub, v1=True)
        if lw is not None and lw.blobs:
            if lw.name in layers:
                raise WeightsError(f"two layers named '{lw.name}' carry weights", path)
            layers[lw.name] = lw
    if not seen_layer_field:
        raise WeightsError("not a caffemodel: it contains no layers", path)
    if len(seen) > 1:  # Caffe's upgrade refuses such a file (and aborts)
        raise WeightsError("mixes old 'layers' and new 'layer' definitions", path)
    try:  # everything but the layers, parsed as Caffe's protobuf would
        caffe_pb2().NetParameter.FromString(bytes(header))
    except DecodeError as exc:
        raise WeightsError(f"not a caffemodel: its net header does not decode ({exc})", path) from None
    if not layers:
        raise WeightsError("contains no weights (no layer has parameter blobs)", path)
    return Weights(layers, path, fmt)


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\x00" not in text and all(c.isprintable() or c in "\n\r\t" for c in text[:2048])


def _parse_layer(reader: _Reader, v1: bool) -> LayerWeights | None:
    pb = caffe_pb2()
    blobs_field = V1_BLOBS if v1 else LAYER_BLOBS
    rest = bytearray()
    blob_readers: list[_Reader] = []
    for number, wire, start, end in reader.fields():
        if number == blobs_field and wire == 2:
            blob_readers.append(reader.sub(start, end))
        elif v1 and number == V1_V0LAYER:
            raise WeightsError("uses the V0 layer format, which fcnify does not read", reader.path)
        else:
            rest += _field_bytes(reader, number, wire, start, end)
    msg = pb.V1LayerParameter() if v1 else pb.LayerParameter()
    try:
        msg.ParseFromString(bytes(rest))
    except DecodeError as exc:
        raise WeightsError(f"not a caffemodel: a layer does not decode ({exc})", reader.path) from None
    if v1:
        enum = pb.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
        value = enum.values_by_number.get(msg.type)
        type_name = V1_TYPES.get(value.name, value.name) if value else str(msg.type)
    else:
        type_name = _text(msg.type)
    name = _text(msg.name)
    blobs, legacy = [], []
    for i, br in enumerate(blob_readers):
        arr, is_legacy = _parse_blob(br, name, i)
        blobs.append(arr)
        legacy.append(is_legacy)
    return LayerWeights(name, type_name, blobs, legacy)


def _text(value: str | bytes) -> str:
    """A string field as text; protobuf hands back bytes when they are not UTF-8."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _field_bytes(reader: _Reader, number: int, wire: int, start: int, end: int) -> bytes:
    key = _varint_bytes((number << 3) | wire)
    payload = bytes(reader.buf[start:end])
    if wire == 2:
        return key + _varint_bytes(len(payload)) + payload
    return key + payload


def _parse_blob(reader: _Reader, layer: str, index: int) -> tuple[np.ndarray, bool]:
    """One BlobProto read as Blob::FromProto reads it.

    The float data (packed or not, in file order) goes straight to numpy;
    every other field is parsed by protobuf. As in Caffe, double_data wins
    over data, legacy num/channels/height/width win over `shape`, and a diff,
    when present, must have the blob's size too.
    """
    pb = caffe_pb2()
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    rest = bytearray()
    what = f"layer '{layer}' blob {index}"
    for number, wire, start, end in reader.fields():
        raw = reader.buf[start:end]
        if number == BLOB_DATA and wire in (2, 5):
            if len(raw) % 4:
                reader.fail(start, f"{what}: float data is not a multiple of 4 bytes")
            floats.append(np.frombuffer(raw, dtype="<f4"))
        elif number == BLOB_DOUBLE_DATA and wire in (2, 1):
            if len(raw) % 8:
                reader.fail(start, f"{what}: double data is not a multiple of 8 bytes")
            doubles.append(np.frombuffer(raw, dtype="<f8"))
        else:
            rest += _field_bytes(reader, number, wire, start, end)
    try:
        msg = pb.BlobProto.FromString(bytes(rest))
    except DecodeError as exc:
        raise WeightsError(f"not a caffemodel: {what} does not decode ({exc})", reader.path) from None
    if doubles:
        values = np.concatenate(doubles).astype(np.float32)
    elif floats:
        values = floats[0] if len(floats) == 1 else np.concatenate(floats)
    else:
        values = np.zeros(0, dtype=np.float32)
    is_legacy = any(msg.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = ((msg.num, msg.channels, msg.height, msg.width) if is_legacy
             else tuple(int(d) for d in msg.shape.dim))
    count = math.prod(shape)
    if count != values.size or any(d < 0 for d in shape):
        raise WeightsError(f"{what}: shape {shape} needs {count} values "
                           f"but the file has {values.size}", reader.path)
    diffs = len(msg.double_diff) or len(msg.diff)
    if diffs and diffs != count:
        raise WeightsError(f"{what}: shape {shape} needs {count} values "
                           f"but the file has {diffs} gradient (diff) values", reader.path)
    return values.reshape(shape), is_legacy


def legacy_shape(shape: Shape) -> Shape:
    """Caffe's 4-axis legacy view of a shape: pad on the left with 1s."""
    if len(shape) > 4:
        return shape
    return (1,) * (4 - len(shape)) + tuple(shape)


def shapes_match(expected: Shape, stored: np.ndarray, *, legacy: bool) -> bool:
    """Blob::ShapeEquals: exact shape, or for legacy blobs the 4-axis view."""
    if legacy:
        return legacy_shape(tuple(expected)) == tuple(stored.shape)
    return tuple(expected) == tuple(stored.shape)


# ------------------------------------------------------------------ writing

def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload: bytes | memoryview) -> bytes:
    return _varint_bytes((number << 3) | 2) + _varint_bytes(len(payload))


def blob_bytes(array: np.ndarray) -> Iterator[bytes | memoryview]:
    """Serialized BlobProto (shape + packed float data), as chunks."""
    pb = caffe_pb2()
    shape = pb.BlobShape(dim=[int(d) for d in array.shape]).SerializeToString()
    data = np.ascontiguousarray(array, dtype="<f4")
    raw = memoryview(data).cast("B")
    yield _len_field(BLOB_SHAPE, shape) + shape
    yield _len_field(BLOB_DATA, raw)
    yield raw


def write_weights(out: BinaryIO, net, blobs: Mapping[str, list[np.ndarray]]) -> None:
    """Write `net` (a NetParameter) with each named layer's blobs as a caffemodel.

    The layer definitions are written as given (without any blobs they carry);
    `blobs` supplies the parameter arrays by layer name.
    """
    header = type(net)()
    header.CopyFrom(net)
    header.ClearField("layer")
    out.write(header.SerializeToString())
    for layer in net.layer:
        bare = type(layer)()
        bare.CopyFrom(layer)
        bare.ClearField("blobs")
        body = [bare.SerializeToString()]
        for array in blobs.get(layer.name, []):
            chunks = list(blob_bytes(array))
            size = sum(len(c) for c in chunks)
            body.append(_varint_bytes((LAYER_BLOBS << 3) | 2) + _varint_bytes(size))
            body.extend(chunks)
        total = sum(len(c) for c in body)
        out.write(_varint_bytes((NET_LAYER << 3) | 2) + _varint_bytes(total))
        for chunk in body:
            out.write(chunk)


def digest(array: np.ndarray) -> str:
    """The digest engines report for a parameter blob in param_digests: BLAKE2b-128 of its float32 bytes."""
    data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()
