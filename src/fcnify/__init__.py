"""fcnify: Caffe net surgery for dense prediction.

    import fcnify
    result = fcnify.convert("deploy.prototxt", "net.caffemodel", "out/mynet")
    dm = fcnify.classify_map("photo.jpg", model="caffenet")
    dm.save("maps/")

Caffe itself runs in a worker process (see engines/sandbox.py): a Caffe abort
becomes an `fcnify.errors.EngineCrash`, never the death of your interpreter.
"""

from .version import __version__  # noqa: E402, F401

from .convert import ConvertResult, convert, verify_files  # noqa: E402
from .dense.dense import DenseMap, DenseModel, classify_map  # noqa: E402
from .errors import FcnifyError  # noqa: E402
from .caffe.geometry import MapGeometry, map_geometry  # noqa: E402
from .io.models import ModelCard, find_model, read_card  # noqa: E402
from .caffe.netdef import read_netdef  # noqa: E402
from .io.preprocess import Preprocess, PreprocessOverrides, resolve_preprocess  # noqa: E402
from .resolve import resolve_card  # noqa: E402
from .surgery.surgery import convert_net  # noqa: E402

__all__ = [
    "ConvertResult", "DenseMap", "DenseModel", "FcnifyError", "MapGeometry", "ModelCard",
    "Preprocess", "PreprocessOverrides", "classify_map", "convert", "convert_net", "find_model",
    "map_geometry", "read_card", "read_netdef", "resolve_card", "resolve_preprocess", "verify_files",
]
