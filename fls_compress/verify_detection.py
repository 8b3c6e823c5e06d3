"""Box agreement between an original and a compressed detector (Ultralytics ``[B, 4+C, N]`` layout).

Ultralytics YOLOv8/11 exports (``metadata_props`` ``task=detect``, ``names``, ``stride``) output one
tensor ``[B, 4 + C, N]``: for each of N anchors a box ``(cx, cy, w, h)`` followed by C class scores.
Output-level errors (cosine, relative L2) do not say whether the *detections* survived compression,
so for each sample :func:`topk_box_agreement` takes the original's ``k`` highest-scoring anchors
(score = max class score, class = its argmax) and counts those the compressed model reproduces: a box
among the compressed model's own top ``k`` with the same class and IoU >= ``iou_threshold`` (0.5, the
PASCAL VOC criterion; Everingham et al. 2010), each compressed box matched at most once, greedily in
the original's score order. No NMS is applied (it would make the metric depend on NMS thresholds).
"""

from __future__ import annotations

import numpy as np

IOU_THRESHOLD = 0.5
TOP_K = 100
DETECT_TASKS = frozenset({"detect", "detection"})


def is_box_output(shape: tuple[int, ...]) -> bool:
    """``[B, 4 + C, N]`` with at least one class and more anchors than rows."""
    return len(shape) == 3 and 5 <= shape[1] < shape[2]


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = boxes.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(cx, cy, w, h)`` boxes ``a`` ``[n, 4]`` and ``b`` ``[m, 4]`` -> ``[n, m]``."""
    a, b = _xyxy(a.astype(np.float64)), _xyxy(b.astype(np.float64))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _top(pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[k, 4]`` and classes ``[k]`` of the ``k`` best anchors of one ``[4 + C, N]`` prediction."""
    scores = pred[4:]
    best = scores.max(axis=0)
    order = np.argsort(-best, kind="stable")[:k]
    return pred[:4, order].T, scores[:, order].argmax(axis=0)


def topk_box_agreement(ref: np.ndarray, out: np.ndarray, k: int = TOP_K, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Per-sample fraction of the original's top-``k`` boxes reproduced by the compressed model."""
    k = min(k, ref.shape[2])
    result = np.empty(ref.shape[0])
    for i in range(ref.shape[0]):
        ref_boxes, ref_cls = _top(ref[i], k)
        new_boxes, new_cls = _top(out[i], k)
        iou = box_iou(ref_boxes, new_boxes)
        iou[ref_cls[:, None] != new_cls[None, :]] = -1.0
        used = np.zeros(k, dtype=bool)
        matched = 0
        for row in range(k):
            candidates = np.where(used, -1.0, iou[row])
            j = int(np.argmax(candidates))
            if candidates[j] >= iou_threshold:
                used[j] = True
                matched += 1
        result[i] = matched / k
    return result
