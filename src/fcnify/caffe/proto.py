"""Caffe's protobuf messages, without pycaffe.

The message classes are built from caffe.proto (compiled by protoc at set-up)
in a private descriptor pool: pycaffe's own caffe_pb2 registers the same names
in protobuf's default pool, and the two cannot both live there.
"""
from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ..errors import SetupError
from ..paths import caffe_descriptor

MESSAGES = (
    "NetParameter", "LayerParameter", "V1LayerParameter", "V0LayerParameter",
    "BlobProto", "BlobShape", "ParamSpec", "NetState", "NetStateRule",
    "ConvolutionParameter", "InnerProductParameter", "PoolingParameter",
    "InputParameter", "FillerParameter", "ReshapeParameter", "FlattenParameter",
)


@lru_cache(maxsize=1)
def caffe_pb2() -> SimpleNamespace:
    """A namespace of Caffe's message classes (NetParameter, LayerParameter, ...)."""
    path = caffe_descriptor()
    try:
        fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
        pool = descriptor_pool.DescriptorPool()
        for f in fds.file:
            pool.Add(f)
        classes = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
                   for name in MESSAGES}
    except Exception as exc:  # a damaged descriptor file
        raise SetupError(f"{path}: cannot load the compiled caffe.proto ({exc}); "
                         "run scripts/setup.sh again") from exc
    ns = SimpleNamespace(**classes)
    ns.pool = pool
    return ns
