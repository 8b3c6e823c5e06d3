"""A small offline corpus of ONNX models shaped like real exports (see :mod:`.builder`)."""
