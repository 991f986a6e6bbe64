"""Per-block cost of a network: forward/backward FLOPs and the bytes crossing every possible cut.

FLOPs are measured, not derived from layer formulas: each block runs once under
``torch.utils.flop_counter.FlopCounterMode`` (forward), then its backward runs under a second
counter. Like that counter, huscf counts multiply-adds of matmuls and convolutions as 2 FLOPs and
ignores biases, normalisation and activations (a few percent of a conv net's work). Transposed
convolutions are counted per *input* position, which is correct (the authors' hand counter used
output positions, 4x too much for stride 2).

Backward FLOPs of a block include its parameter gradients and the gradient with respect to its
input when that input comes from a differentiable source: always for middle and tail blocks; for
block 0 only when ``input_grad`` is set (the discriminator: its image input is the generator's
fake in the generator step; the generator's noise and labels need no gradient).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from huscf.models.blocks import takes_label
from huscf.models.cgan import Architecture


@dataclass(frozen=True)
class NetProfile:
    """Costs of one block network at one batch size; index b is block b (0 .. M+1)."""

    fwd_flops: tuple[int, ...]
    bwd_flops: tuple[int, ...]
    out_bytes: tuple[int, ...]  # bytes of block b's output = the activation at a cut after block b

    @property
    def num_middle(self) -> int:
        return len(self.fwd_flops) - 2


@dataclass(frozen=True)
class ArchProfile:
    """Profiles of a G/D pair: what the latency model needs to know about an architecture."""

    g: NetProfile
    d: NetProfile
    batch_size: int


def profile_blocks(blocks: Sequence[nn.Module], inputs: tuple, input_grad: bool = False,
                   dtype: torch.dtype = torch.float32) -> NetProfile:
    """Measure every block of ``blocks`` on ``inputs`` (the tuple block 0 takes).

    ``dtype`` is the element type activations travel in (it sets the bytes, not the FLOPs).
    Runs on copies, in train mode: the caller's blocks keep their gradients and BatchNorm state.
    """
    blocks = copy.deepcopy(list(blocks))
    itemsize = torch.empty((), dtype=dtype).element_size()
    fwd, bwd, out_bytes = [], [], []
    h = tuple(inputs)
    for b, block in enumerate(blocks):
        block.train()
        args = tuple(t.detach().requires_grad_((input_grad or b > 0) and t.is_floating_point()) for t in h)
        with FlopCounterMode(display=False) as counter:
            out = block(*args)
        fwd.append(int(counter.get_total_flops()))
        grad = torch.randn_like(out)
        with FlopCounterMode(display=False) as counter:
            out.backward(grad)
        bwd.append(int(counter.get_total_flops()))
        out_bytes.append(out.numel() * itemsize)
        # a tail block that takes the label (``model.labels: tail``) gets block 0's
        h = (out.detach(), inputs[1]) if b + 2 == len(blocks) and takes_label(blocks[-1]) else (out.detach(),)
    return NetProfile(tuple(fwd), tuple(bwd), tuple(out_bytes))


@lru_cache(maxsize=32)
def profile_architecture(arch: Architecture, batch_size: int, dtype: torch.dtype = torch.float32) -> ArchProfile:
    """Profile an architecture's G and D at ``batch_size`` (cached: the arch spec is hashable)."""
    gen = torch.Generator().manual_seed(0)
    g = profile_blocks(list(arch.generator().blocks), arch.generator_inputs(batch_size, gen), False, dtype)
    d = profile_blocks(list(arch.discriminator().blocks), arch.discriminator_inputs(batch_size, gen), True, dtype)
    return ArchProfile(g, d, batch_size)
