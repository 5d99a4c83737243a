"""How fcnify reads a Caffe net: the protobuf schema, net definitions, weights, shapes, geometry and memory."""
