"""fls-compress: second-order compression of existing ONNX models.

Library entry point::

    from fls_compress import compress, FLSConfig, RunOptions
    report = compress("model.onnx", FLSConfig(sparsity=0.9), "calib.npz", output="pruned.onnx")

The library is organised by responsibility (data flows top to bottom):

* :mod:`fls_compress.io` - ONNX files, calibration data, activations, paths, atomic writes, write-back.
* :mod:`fls_compress.bridge` - ONNX -> PyTorch conversion (onnx2torch) with weight-name mapping.
* :mod:`fls_compress.curvature` - inverse-Fisher estimators (FishLeg, oBERT/WoodFisher, M-FAC, iEF).
* :mod:`fls_compress.pruning` - Optimal Brain Surgeon pruning and the baselines; the config -> handler registry.
* :mod:`fls_compress.verification` - onnxruntime verification of the compressed model against the original.
* :mod:`fls_compress.configs` - one typed config per method, the run options; :mod:`fls_compress.engine` - ``compress()``.
"""

__version__ = "0.2.0"

from .configs import (  # noqa: E402  (configs are light: no torch, no onnxruntime)
    AutoConfig,
    FLSConfig,
    FLSQuantConfig,
    GPTQConfig,
    IEFConfig,
    MagnitudeConfig,
    MFACConfig,
    OBertConfig,
    QuantizeConfig,
    RTNConfig,
    RunOptions,
    SparseGPTConfig,
    WandaConfig,
    config_from_dict,
)


def __getattr__(name: str):
    """``compress``, ``verify`` and ``Report`` load torch/onnxruntime on first use, not at import."""
    if name == "compress":
        from .engine import compress

        return compress
    if name == "verify":
        from .engine import verify

        return verify
    if name == "Report":
        from .report import Report

        return Report
    raise AttributeError(f"module 'fls_compress' has no attribute {name!r}")


__all__ = [
    "AutoConfig", "FLSConfig", "FLSQuantConfig", "GPTQConfig", "QuantizeConfig", "RTNConfig", "IEFConfig", "MagnitudeConfig", "MFACConfig", "OBertConfig", "Report", "RunOptions",
    "SparseGPTConfig", "WandaConfig", "compress", "config_from_dict", "verify",
]
