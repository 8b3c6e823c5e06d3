"""ONNX -> PyTorch bridge: graph preparation, onnx2torch compatibility converters, conversion with a
verified map from ONNX initializer names to trainable torch parameters (see :mod:`.convert`)."""
