"""fcnify: Caffe net surgery for dense prediction."""

__version__ = "0.1.0"
