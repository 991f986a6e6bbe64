"""What a block is, and a network as an ordered list of blocks.

A network is ``[b_0, b_1, ..., b_M, b_{M+1}]``:

* ``b_0`` (the *head block*) takes the raw inputs of the network: ``(z, y)`` for a generator,
  ``(x, y)`` for a discriminator. It always runs on the client, because it touches the label.
* ``b_1 .. b_M`` (the *middle blocks*) map one tensor to one tensor. Any of them may run on the
  client or on the server, depending on the client's cuts.
* ``b_{M+1}`` (the *tail block*) produces the output (an image, or a discriminator logit). It
  always runs on the client, because its output is data or feeds the loss. A tail block whose
  ``takes_label`` is true takes ``(h, y)`` (``model.labels: tail``: the label enters there and
  block 0 ignores it); otherwise ``h`` alone.

Nothing in the split, the federation or the cut profiler knows more about an architecture
than this, so any block list with these three roles works.
"""

from __future__ import annotations

import torch
from torch import nn


def takes_label(block: nn.Module) -> bool:
    """Whether ``block`` (a tail block) takes the label beside its input: ``block(h, y)``."""
    return bool(getattr(block, "takes_label", False))


def run_tail_block(block: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The tail block on ``h``, given the label ``y`` when it takes one."""
    if not takes_label(block):
        return block(h)
    if y is None:
        raise ValueError("this tail block takes the label (model.labels: tail), and none was given")
    return block(h, y)


class BlockNet(nn.Module):
    """An ordered list of blocks with the roles described in the module docstring."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        if len(blocks) < 3:
            raise ValueError("a block network needs a head block, >= 1 middle block and a tail block")
        self.blocks = nn.ModuleList(blocks)

    @property
    def num_middle(self) -> int:
        """M, the number of middle blocks (the ones a cut can move)."""
        return len(self.blocks) - 2

    def run(self, start: int, stop: int, h, y: torch.Tensor | None = None):
        """Run blocks ``start .. stop-1`` on ``h`` (a tuple of inputs when ``start == 0``); ``y``: the
        label, for a tail block that takes it (default: the label among ``h`` when ``start == 0``)."""
        if y is None and start == 0:
            y = h[1]
        last = len(self.blocks) - 1
        for i in range(start, stop):
            block = self.blocks[i]
            h = block(*h) if i == 0 else run_tail_block(block, h, y) if i == last else block(h)
        return h

    def forward(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(0, len(self.blocks), (a, y))
