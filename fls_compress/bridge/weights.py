"""The link between one ONNX initializer and the torch tensor that stands for it during calibration.

onnx2torch absorbs Conv/Gemm weights into ``nn.Conv*``/``nn.Linear`` parameters (Gemm with ``transB=0``
stores W^T, and ``alpha`` is folded into the weight) and keeps MatMul constants as buffers. A
:class:`PrunableWeight` records exactly how the torch tensor relates to the ONNX array, so that

* curvature estimators can work on a canonical 2-D *matrix view* ``(out_features, in_features)``
  (row = output unit, column = input feature; for Conv ``in_features = C_in/groups * prod(kernel)``),
  which is the layout assumed by Kronecker-factored inverse-Fisher forms
  (vec(X U Y) = (X kron Y^T) vec(U), row-major), and
* the pruned tensor can be written back to the ONNX initializer bit-for-bit in the original layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PrunableWeight:
    """One prunable ONNX initializer and its torch stand-in.

    Attributes
    ----------
    name:
        The ONNX initializer name (the key used everywhere: masks, curvature blocks, reports).
    op_type:
        The consuming ONNX op: ``"Conv"``, ``"ConvTranspose"``, ``"Gemm"``, ``"MatMul"``, ``"LSTM"`` or ``"GRU"``.
    parameter:
        The trainable torch tensor. Initializers consumed by several nodes map to ONE parameter
        (tied), so a gradient sums over every use.
    onnx_shape / onnx_dtype:
        Shape and numpy dtype of the ONNX initializer.
    transpose:
        ``True`` when the torch tensor is the transpose of the 2-D ONNX array (Gemm ``transB=0``).
    scale:
        Multiplicative factor folded into the torch tensor (Gemm ``alpha``): torch = scale * onnx.
    matrix_transpose:
        ``True`` when the matrix view (out, in) is the transpose of the torch tensor. MatMul
        ``Y = X @ W`` keeps W as ``[in, out]``, so its matrix view is ``W.T``.
    consumers:
        Names (or op types) of the ONNX nodes that read this initializer.
    """

    name: str
    op_type: str
    parameter: torch.nn.Parameter
    onnx_shape: tuple[int, ...]
    onnx_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    transpose: bool = False
    scale: float = 1.0
    matrix_transpose: bool = False
    consumers: tuple[str, ...] = ()

    # ----------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return int(self.parameter.numel())

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the canonical matrix view."""
        return tuple(self.to_matrix(self.parameter.detach()).shape)  # type: ignore[return-value]

    def to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """Map a tensor shaped like ``parameter`` to the (out, in) matrix view (a view when possible).

        LSTM/GRU ``W`` / ``R`` ``[dirs, gates*H, in]`` give ``[dirs*gates*H, in]`` (one row per gate unit).
        """
        if self.op_type in ("LSTM", "GRU"):
            return tensor.reshape(-1, tensor.shape[-1])
        if self.matrix_transpose:
            return tensor.reshape(tensor.shape[0], -1).t()
        return tensor.reshape(tensor.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`: back to the shape of ``parameter``."""
        if self.op_type in ("LSTM", "GRU"):
            return matrix.reshape(self.parameter.shape)
        if self.matrix_transpose:
            return matrix.t().reshape(self.parameter.shape)
        return matrix.reshape(self.parameter.shape)

    def to_onnx(self, tensor: torch.Tensor | None = None) -> np.ndarray:
        """The ONNX initializer array for ``tensor`` (default: the current parameter value)."""
        t = (self.parameter if tensor is None else tensor).detach().to("cpu", torch.float64)
        if self.scale != 1.0:
            t = t / self.scale
        if self.transpose:
            t = t.t()
        arr = t.numpy().reshape(self.onnx_shape)
        return arr.astype(self.onnx_dtype, copy=False)
