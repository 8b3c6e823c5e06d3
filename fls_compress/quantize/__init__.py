"""OBS-compensated weight quantisation and QDQ ONNX export.

* :mod:`.grid` - integer grids (4/8 bit, symmetric or not, per tensor / channel / block);
* :mod:`.gptq` - RTN, GPTQ and the FishLeg-curvature sweep on one matrix (joint pruning included);
* :mod:`.qdq` - weight-only QDQ (``DequantizeLinear``) export, opset rules, refusal of quantised models;
* :mod:`.nbits` - 4-bit MatMul/Gemm weights as ``com.microsoft.MatMulNBits`` (onnxruntime's 4-bit kernel);
* :mod:`.activations` - static int8 activation QDQ placed for onnxruntime's integer kernels;
* :mod:`.act_ranges` - activation ranges: minmax, percentile, entropy (KL);
* :mod:`.model` - :func:`quantize_weights` / :func:`quantize_model` over a whole ONNX graph.
"""

from .grid import Grid, QuantSpec
from .model import quantize_model, quantize_weights

__all__ = ["Grid", "QuantSpec", "quantize_model", "quantize_weights"]
