"""YOLOv8-style building blocks (Jocher et al., Ultralytics YOLOv8, 2023: C2f, SPPF), written here from the
architecture description, for structured-pruning tests and the coverage benchmark: the graphs users export
from Ultralytics models have these shapes (a channel Split of cv1's output, bottlenecks appended, one Concat
into cv2; SPPF's max-pool chain concatenated), random weights with BatchNorm statistics drawn as a trained
network's would be. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch


class ConvBnSiLU(torch.nn.Module):
    def __init__(self, a: int, b: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(a, b, k, stride, padding=k // 2, bias=False)
        self.bn = torch.nn.BatchNorm2d(b)

    def forward(self, x):
        return torch.nn.functional.silu(self.bn(self.conv(x)))


class Bottleneck(torch.nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBnSiLU(c, c, 3), ConvBnSiLU(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(torch.nn.Module):
    """cv1 to 2c channels, split in two (``chunk`` as Ultralytics writes it, or ``split((c, c))``), each
    bottleneck applied to the last piece and appended, everything concatenated into cv2."""

    def __init__(self, c1: int, c2: int, n: int, shortcut: bool, chunk: bool = False):
        super().__init__()
        self.c, self.chunk = c2 // 2, chunk
        self.cv1, self.cv2 = ConvBnSiLU(c1, 2 * self.c), ConvBnSiLU((2 + n) * self.c, c2)
        self.m = torch.nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        h = self.cv1(x)
        y = list(h.chunk(2, 1) if self.chunk else h.split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(torch.nn.Module):
    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBnSiLU(c1, c1 // 2), ConvBnSiLU(c1 * 2, c2)
        self.pool = torch.nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class C2fNet(torch.nn.Module):
    """stem -> one C2f(16, 16, n=2) -> 1x1 head (the smallest graph with the C2f pattern)."""

    def __init__(self, shortcut: bool, chunk: bool):
        super().__init__()
        self.stem, self.c2f, self.head = ConvBnSiLU(3, 16, 3), C2f(16, 16, 2, shortcut, chunk), torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.c2f(self.stem(x)))


class YoloStyle(torch.nn.Module):
    """A small YOLOv8-style detector: strided convs and C2f with shortcuts (backbone), SPPF, an upsampling
    FPN step with a C2f without shortcuts (neck), and a 1x1 prediction conv per scale."""

    def __init__(self, chunk: bool):
        super().__init__()
        self.b0, self.b1 = ConvBnSiLU(3, 16, 3, 2), ConvBnSiLU(16, 32, 3, 2)
        self.c1 = C2f(32, 32, 1, True, chunk)
        self.b2 = ConvBnSiLU(32, 64, 3, 2)
        self.c2 = C2f(64, 64, 2, True, chunk)
        self.sppf = SPPF(64, 64)
        self.up = torch.nn.Upsample(scale_factor=2.0, mode="nearest")
        self.n1 = C2f(96, 32, 1, False, chunk)
        self.p3, self.p4 = torch.nn.Conv2d(32, 12, 1), torch.nn.Conv2d(64, 12, 1)

    def forward(self, x):
        p3 = self.c1(self.b1(self.b0(x)))
        p4 = self.sppf(self.c2(self.b2(p3)))
        n3 = self.n1(torch.cat([self.up(p4), p3], 1))
        return self.p3(n3), self.p4(p4)


def randomize_batchnorm(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm statistics and shifts as a trained network's would vary (the initial ones are all equal)."""
    torch.manual_seed(seed)
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def export(net: torch.nn.Module, path: Path, size: int, dynamo: bool, outputs: int = 1) -> Path:
    """``net`` on [N, 3, size, size] to ONNX: the torch legacy exporter at opset 17, or dynamo at opset 18,
    dynamic batch."""
    x = torch.randn(2, 3, size, size)
    names = ["y"] if outputs == 1 else [f"y{k}" for k in range(outputs)]
    if dynamo:
        torch.onnx.export(net, (x,), path, input_names=["x"], output_names=names, dynamo=True, opset_version=18,
                          dynamic_shapes=({0: torch.export.Dim("n")},))
    else:
        torch.onnx.export(net, (x,), path, input_names=["x"], output_names=names, opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "n"}, **{o: {0: "n"} for o in names}})
    return path
