"""fls-compress: second-order compression of existing ONNX models.

Library entry point::

    from fls_compress import compress, FLSConfig, RunOptions
    report = compress("model.onnx", FLSConfig(sparsity=0.9), "calib.npz", output="pruned.onnx")

The library is organised by responsibility (data flows top to bottom):

* :mod:`fls_compress.io` - ONNX files, calibration data, activations, paths, atomic writes, write-back.
* :mod:`fls_compress.bridge` - ONNX -> PyTorch conversion (onnx2torch) with weight-name mapping.
* :mod:`fls_compress.curvature` - inverse-Fisher estimators (FishLeg, oBERT/WoodFisher, M-FAC, iEF).
* :mod:`fls_compress.pruning` - Optimal Brain Surgeon pruning and the baselines; the config -> handler registry.
* :mod:`fls_compress.verify` - onnxruntime verification of the compressed model against the original.
* :mod:`fls_compress.configs` - one typed config per method, the run options; :mod:`fls_compress.engine` - ``compress()``.
"""

__version__ = "0.2.0"

from .configs import (  # noqa: E402
    AutoConfig,
    FLSConfig,
    IEFConfig,
    MagnitudeConfig,
    MFACConfig,
    OBertConfig,
    RunOptions,
    SparseGPTConfig,
    WandaConfig,
    config_from_dict,
)
from .engine import compress  # noqa: E402
from .report import Report  # noqa: E402


def verify(original, compressed, data=None, *, labels=None, seed: int = 0) -> Report:
    """Compare two ONNX models (paths or protos) with onnxruntime on ``data`` (synthetic if ``None``)."""
    from .io.calibration import load_calibration
    from .io.onnx_model import load_onnx
    from .report import new_report
    from .verify import verify_models

    ref = original if not isinstance(original, (str, bytes)) and hasattr(original, "graph") else load_onnx(original)
    calib = load_calibration(None if data is None else str(data), ref, seed=seed,
                             labels_path=None if labels is None else str(labels))
    rep = new_report("verify")
    rep.update(status="ok", verification=verify_models(ref, compressed, calib))
    return rep


__all__ = [
    "AutoConfig", "FLSConfig", "IEFConfig", "MagnitudeConfig", "MFACConfig", "OBertConfig", "Report", "RunOptions",
    "SparseGPTConfig", "WandaConfig", "compress", "config_from_dict", "verify",
]
