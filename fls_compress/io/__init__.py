"""Input/output of ONNX models: loading and validation, prunable-site discovery, write-back, saving."""
