"""4-bit MatMul / Gemm weights as onnxruntime's ``com.microsoft.MatMulNBits``, the kernel onnxruntime runs
4-bit weights with (its QDQ path dequantizes to float otherwise); also the only 4-bit form below opset 21.

``DequantizeLinear`` takes int4 codes only from opset 21. When a model's opset cannot be raised,
MatMul weights read as ``X @ W`` can still carry 4-bit codes through the onnxruntime contrib operator
``MatMulNBits`` (Y = A @ dequant(B)^T [+ bias], B quantised in blocks along K; onnxruntime contrib-operator
specification; a Gemm's B in either layout is the (N, K) code matrix, its bias MatMulNBits' input 5): B is uint8 [N, K / block, block / 2] with two codes per byte (low nibble first),
``scales`` float [N * K / block], optional ``zero_points`` uint8 [N * ceil((K / block) / 2)] packed
the same way (absent: 8). Signed codes c in [-8, 7] are stored as c + 8 with the default zero point
8, so the dequantised values (code - zero_point) * scale are those of the grid. ``block_size`` must be
a power of two >= 16: a ``block:g`` grid needs such a g; per-channel / per-tensor grids (their scale
repeated over the blocks of a row) use :data:`CHANNEL_BLOCK` = 128, or for K < 128 the smallest power of
two >= max(K, 16): the fastest block on onnxruntime 1.32's x86 kernels (benchmarks/nbits_choice.py,
docs/design/w8a8.md: at batch 64 with accuracy_level 4, block 128 ran the wide MLP 1.80x and the MNIST
autoencoder 1.34x faster than dense, block 32 1.53x / 1.05x). B holds ceil(K / block_size) blocks per column: when the block does not divide K the
last block is padded with codes of value 0 (the zero point), which the kernel reads but multiplies by
nothing (A has K columns), so every 4-bit MatMul/Gemm weight can be written as MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError
from ..io.activations import LayerUse
from ..io.onnx_model import PrunableSite
from .grid import Grid

DOMAIN = "com.microsoft"


#: MatMulNBits block of a per-channel / per-tensor grid (K >= 128; the last block padded when 128 does not divide K)
CHANNEL_BLOCK = 128


def nbits_block(grid: Grid, k: int) -> int | None:
    """The MatMulNBits block size that expresses ``grid`` over K columns, or None."""
    g = grid.spec.block
    if g is not None:
        return g if g >= 16 and g & (g - 1) == 0 else None
    b = 16
    while b < min(k, CHANNEL_BLOCK):
        b *= 2
    return b


def _gemm_bias_ok(node: onnx.NodeProto, n: int, inits: dict[str, onnx.TensorProto] | None) -> bool:
    """A Gemm MatMulNBits can replace: Y = A B' + c with alpha = beta = 1, A not transposed, c absent or
    a float [N] initializer (MatMulNBits' optional bias input)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or (len(node.input) > 2 and attrs.get("beta", 1.0) != 1.0):
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    bias = (inits or {}).get(node.input[2])
    return bias is not None and bias.data_type == onnx.TensorProto.FLOAT and list(bias.dims) == [n]


def nbits_supported(site: PrunableSite, uses: list[LayerUse], grid: Grid, name: str,
                    inits: dict[str, onnx.TensorProto] | None = None) -> str | None:
    """Why this weight cannot become MatMulNBits (None: it can): MatMul weights read as X @ W, and Gemm
    weights (either transB) with alpha = beta = 1 and a [N] bias (``inits`` holds the graph's initializers)."""
    if grid.spec.bits != 4:
        return "only 4-bit weights"
    if site.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in uses[0].node.attribute)
        k, n = (site.shape[1], site.shape[0]) if trans_b else (site.shape[0], site.shape[1])
        if any(u.weight_position != 1 or u.node.input[1] != name or not _gemm_bias_ok(u.node, int(n), inits) for u in uses):
            return "only Gemm weights with alpha = beta = 1, A not transposed and a [N] bias"
    elif site.op_type != "MatMul" or any(u.weight_position != 1 or u.node.input[1] != name for u in uses):
        return "only MatMul weights read directly as X @ W"
    else:
        k = site.shape[0]
    if nbits_block(grid, int(k)) is None:
        return "block size must be a power of two >= 16"
    return None


def _pack(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (last axis even)."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)


def write_matmul_nbits(graph: onnx.GraphProto, name: str, codes: np.ndarray, grid: Grid, uses: list[LayerUse],
                       unique) -> None:
    """Replace each MatMul reading initializer ``name`` by MatMulNBits over the (out=N, in=K) ``codes``."""
    n, k = codes.shape
    block = nbits_block(grid, k)
    if block is None:
        raise UnsupportedModelError(f"{name!r}: no MatMulNBits block size fits")
    blocks = -(-k // block)
    if grid.group_size == block:  # block:g grid
        scale, zero = grid.scale, grid.zero_point
    else:  # per-channel / per-tensor: the row's one scale repeated over its blocks
        scale, zero = np.repeat(grid.scale, blocks, axis=1), np.repeat(grid.zero_point, blocks, axis=1)
    stored = codes + 8 if grid.spec.symmetric else codes
    if blocks * block > k:  # pad the last block with the code of 0 (the zero point of its block)
        pad = np.repeat((zero[:, -1:] + 8) if grid.spec.symmetric else zero[:, -1:], blocks * block - k, axis=1)
        stored = np.concatenate([stored, pad], axis=1)
    b_name, s_name = unique(f"{name}_nbits"), unique(f"{name}_nbits_scale")
    graph.initializer.append(numpy_helper.from_array(_pack(stored.reshape(n, blocks, block)), b_name))
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scale.reshape(-1), dtype=np.float32), s_name))
    inputs = [b_name, s_name]
    if not grid.spec.symmetric:
        z = zero if blocks % 2 == 0 else np.concatenate([zero, np.zeros((n, 1), zero.dtype)], axis=1)
        z_name = unique(f"{name}_nbits_zero_point")
        graph.initializer.append(numpy_helper.from_array(_pack(z).reshape(-1), z_name))
        inputs.append(z_name)
    for use in uses:
        node = next(nd for nd in graph.node if nd == use.node)
        bias = list(node.input[2:3]) if node.op_type == "Gemm" else []
        ins = [node.input[0], *inputs]
        if bias and bias[0]:  # inputs 3 (zero points) and 4 (g_idx) are optional: empty names
            ins += [""] * (4 - len(inputs)) + bias
        new = helper.make_node("MatMulNBits", ins, list(node.output),
                               name=node.name or unique(f"{name}_MatMulNBits"), domain=DOMAIN, K=k, N=n, bits=4,
                               block_size=block)
        node.CopyFrom(new)
