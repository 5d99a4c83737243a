"""An engine that exists only in the tests: the Caffe engine under another name, counting its loads.

tests/test_engines.py adds it to engines.ENGINES as one row, to show that a
new engine needs nothing else to run through classify-map and verify.
"""
from __future__ import annotations

from fcnify.engines.caffe_engine import CaffeRunner


class FakeRunner(CaffeRunner):
    """CaffeRunner named "fake"; `loads` counts the nets it loaded."""

    name = "fake"
    loads = 0

    def load(self, model_def, weights=None):
        FakeRunner.loads += 1
        return super().load(model_def, weights)
