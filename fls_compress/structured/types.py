"""The records of the structural-group analysis (:mod:`fls_compress.structured.groups`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Slice:
    """An initializer indexed by the group's channels along ``axis``, ``block`` entries per channel."""

    name: str
    axis: int
    block: int = 1
    role: str = ""  # producer weight / producer bias / batchnorm ... / constant / consumer weight
    offset: int = 0  # channels before the group's along ``axis`` (after a Concat)
    extra: int = 0  # channels of other tensors along ``axis`` (after a Concat): it holds size + extra


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the group's channels as input columns of its (out, in) matrix view."""

    weight: str
    node: str
    op_type: str
    block: int  # matrix-view columns per channel: prod(kernel) for Conv, H*W after a Flatten, else 1
    bias: str | None  # its own bias initializer (for the OBS bias compensation), if it has one
    offset: int = 0  # channels of other Concat inputs before the group's among its input channels
    extra: int = 0  # channels of other Concat inputs among its input channels


@dataclass(frozen=True)
class Group:
    """One prunable structural group: the producer's output channels and everything indexed by them."""

    kind: str  # "channels" | "neurons"
    producer: str  # producer weight name
    node: str  # producer node label
    op_type: str
    size: int  # channels / neurons
    slices: tuple[Slice, ...]
    consumers: tuple[Consumer, ...]
    tensors: tuple[tuple[str, int, int, int], ...]  # activations whose dim shrinks: (name, axis (< 0), block (0 =
    #: unknown), channels of other Concat inputs beside the group's)
    attributes: tuple[tuple[str, str, int], ...] = ()  # (node label, attribute, other channels): set to kept + other
    coupled: tuple[str, ...] = ()  # weights of the other producers whose channels go with ``producer``'s
    #: (shape constant, entry, other channels, Reshape output, features per channel): the entry is set to
    #: (kept + other channels) x features per channel
    shape_constants: tuple[tuple[str, int, int, str, int], ...] = ()
    #: (k, parts) when the producer's output is split on the channel axis into ``parts`` tensors (YOLOv8's
    #: C2f ``cv1(x).split((c, c), 1)``) and this group is the channels of part k (the producer's slices then
    #: carry their offset); None: all of the producer's channels
    part: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """The group's name in reports and across re-analyses: the producer weight, with ``#k`` for a part."""
        return self.producer if self.part is None else f"{self.producer}#{self.part[0]}"


@dataclass(frozen=True)
class Skipped:
    """A producer whose channels stay whole, and why."""

    producer: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"producer": self.producer, "node": self.node, "reason": self.reason}


@dataclass
class Analysis:
    groups: list[Group] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class Reject(Exception):
    """A reason the group cannot be rewritten."""


class SplitParts(Reject):
    """A producer's whole output reaches a channel-axis Split: prunable as one group per part, (start, count)."""

    def __init__(self, reason: str, parts: list[tuple[int, int]]):
        super().__init__(reason)
        self.parts = parts
