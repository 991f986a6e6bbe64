"""Cut points: which blocks of G and D a client computes and which the server computes.

A client's cuts are four numbers ``(hg, tg, hd, td)``: how many *middle* blocks of the
generator it keeps on its head and on its tail, and the same for the discriminator. For a
network with M middle blocks (blocks 1..M; block 0 and block M+1 always stay on the client),
the client runs blocks ``0..h`` (head) and ``M+1-t..M+1`` (tail), the server runs
``h+1..M-t``, which must be at least one block: ``h + t <= M - 1``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

from huscf.errors import HuscfError


class Cuts(NamedTuple):
    """One client's four cut points (counts of middle blocks kept on the client)."""

    hg: int
    tg: int
    hd: int
    td: int


class SegmentRange(NamedTuple):
    """Block index ranges (half-open) of one network for one client."""

    head: range  # client
    server: range  # server
    tail: range  # client


def segment_ranges(head: int, tail: int, num_middle: int) -> SegmentRange:
    """Block ranges for a network with ``num_middle`` middle blocks and cuts ``(head, tail)``."""
    last = num_middle + 1
    return SegmentRange(range(0, head + 1), range(head + 1, last - tail), range(last - tail, last + 1))


def validate_cuts(cuts: Sequence[int], g_middle: int, d_middle: int, client: int | str = "?") -> Cuts:
    """Return ``Cuts`` or raise a one-line ``HuscfError`` naming the client and the field."""
    if len(cuts) != 4:
        raise HuscfError(f"client {client}: cuts must be 4 integers [hg, tg, hd, td], got {list(cuts)}")
    c = Cuts(*cuts)
    for field, value in c._asdict().items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HuscfError(f"client {client}: cut {field}={value!r} must be a non-negative integer")
    for net, (h, t, m) in {"generator": (c.hg, c.tg, g_middle), "discriminator": (c.hd, c.td, d_middle)}.items():
        if h + t > m - 1:
            raise HuscfError(f"client {client}: {net} cuts head={h} + tail={t} leave the server no block "
                             f"(the {net} has {m} middle blocks, so head + tail must be <= {m - 1})")
    return c


def all_cut_pairs(num_middle: int) -> list[tuple[int, int]]:
    """Every valid (head, tail) pair for one network."""
    return [(h, t) for h in range(num_middle) for t in range(num_middle) if h + t <= num_middle - 1]


def all_cuts(g_middle: int, d_middle: int) -> list[Cuts]:
    """Every valid four-number cut configuration."""
    return [Cuts(*g, *d) for g, d in itertools.product(all_cut_pairs(g_middle), all_cut_pairs(d_middle))]


def whole_network_cuts(g_middle: int, d_middle: int) -> Cuts:
    """The client holds every block of G and D and the server none: the non-split baselines
    (FedGAN, local, centralised, ...). Never a valid HuSCF-GAN cut (``validate_cuts`` refuses it)."""
    return Cuts(g_middle, 0, d_middle, 0)
