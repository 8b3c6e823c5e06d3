"""fls-compress: second-order compression of existing ONNX models.

The library is organised by responsibility:

* :mod:`fls_compress.io` - reading/validating ONNX files, calibration data, atomic writes, write-back.
* :mod:`fls_compress.bridge` - ONNX -> PyTorch conversion (onnx2torch) with initializer-name mapping.
* :mod:`fls_compress.curvature` - inverse-Fisher estimators (FishLeg, oBERT/WoodFisher, M-FAC, iEF).
* :mod:`fls_compress.pruning` - Optimal Brain Surgeon pruning and the baselines.
* :mod:`fls_compress.verify` - onnxruntime verification of the compressed model against the original.
"""

__version__ = "0.1.0"
