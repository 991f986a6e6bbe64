"""What one HuSCF-GAN iteration computes, written once: the engines decide where and in what order.

For the clients of an iteration (client i: its real batch (x_i, y_i), its noise z_i):

1. fake_i = G_i(z_i, y_i), through client i's head -> the server body -> client i's tail
   (``generate_fakes``); a method may draw the fakes' noise and labels itself, and different ones
   for step 3 (``FakeInputs``: MD-GAN's server-drawn batches);
2. discriminator step: L_D,i = BCE(D_i(fake_i.detach(), y_i), FAKE) + BCE(D_i(x_i, y_i), REAL)
   (``discriminator_step``); every client's loss is back-propagated, so the server's D blocks hold
   the sum of all clients' gradients, then each D optimiser (every client's, the server's) steps once;
3. generator step, D's weights frozen: L_G,i = BCE(D_i(fake_i, y_i), REAL), back-propagated
   through D into G; then each G optimiser steps once (``generator_step``).

BCE is ``binary_cross_entropy_with_logits``, the mean over the batch, computed at the client's
tail only (the server never sees a label, a loss or a decision). A loss that is not finite stops
the run with one line (``check_finite``). Every optimiser is Adam with the run's learning rate
and betas (``adam``).

The steps run on ``Pieces``: an engine's answer to *where* each piece runs, for groups of
clients. ``SimulationEngine`` makes a group of one client, ``BatchedEngine`` a chunk of clients
stacked into one tensor (``per_row``: one loss per client), a Ray ``ClientHost`` the clients it
hosts, whose passes cross to the server actor as messages. The Ray driver runs steps 1-2 and 3 as
two phases, with the server's optimiser steps between.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Hashable, Protocol

import torch
import torch.nn.functional as F

from huscf.config import TrainConfig
from huscf.engines.execution import for_loss
from huscf.errors import HuscfError

FAKE, REAL = 0.0, 1.0  # the discriminator's targets


class Pieces(Protocol):
    """Where an engine runs the pieces of an iteration. A *group* is whatever the engine runs at
    once (one client, a chunk of clients, a host's clients); D's logits for a group have one row
    per client when ``per_row``."""

    per_row: bool  # a group's logits are stacked per client: one loss per client
    # step 1 keeps no graph; step 3 generates its fakes again (``generate(again=True)``): from the same
    # noise and labels, or from the generator step's own when a method draws them (``FakeInputs``)
    recompute: bool

    def generate(self, group: Hashable, *, again: bool = False) -> torch.Tensor:
        """G(z, y) for the group, head -> body -> tail; ``again``: step 3's fakes."""

    def discriminate(self, group: Hashable, fake: torch.Tensor, *, real: bool):
        """D's logits on ``fake`` given its labels; with ``real`` (step 2), the pair (on ``fake``, on
        the group's real batch given its labels)."""

    def backward(self, group: Hashable, loss: torch.Tensor, what: str, where: tuple):
        """Back-propagate the group's loss through every seam it crossed, after checking it is
        finite (now, or before the next iteration); returns the loss as the engine records it."""

    def zero_grad(self, net: str) -> None: ...

    def step(self, net: str) -> None: ...

    def requires_grad(self, net: str, flag: bool) -> None: ...


class FakeInputs(Protocol):
    """A method's own inputs for the fakes, set as ``engine.fake_inputs`` (default None: client i's
    fakes come from its own noise z_i and its real batch's labels y_i, one fake batch for steps 2
    and 3). With it, step 2's and step 3's fakes may differ, as may their labels from the real
    batch's (MD-GAN: the server draws them)."""

    def draw(self, noise: torch.Generator, rows: dict[int, int], z_dim: int) -> dict[int, tuple]:
        """For every client i (with ``rows[i]`` real samples this iteration, in client order), the
        ((z, y) of its discriminator step's fakes, (z, y) of its generator step's fakes), drawn from
        ``noise`` (float32 noise, int64 labels, on the CPU)."""


def generate_fakes(p: Pieces, groups) -> dict:
    """Step 1: every group's fakes (without a graph when step 3 recomputes them)."""
    with torch.no_grad() if p.recompute else nullcontext():
        return {g: p.generate(g) for g in groups}


def discriminator_step(p: Pieces, groups, fakes: dict, where: tuple) -> dict:
    """Step 2. Each group's loss is back-propagated as soon as it exists, freeing its graph: the
    server's gradient is the same sum over clients, with one group's activations alive at a time."""
    p.zero_grad("D")
    losses = {}
    for g in groups:
        out_fake, out_real = p.discriminate(g, fakes[g].detach(), real=True)
        losses[g] = p.backward(g, discriminator_loss(out_fake, out_real, per_row=p.per_row), "discriminator", where)
    p.step("D")
    return losses


def generator_step(p: Pieces, groups, fakes: dict, where: tuple) -> dict:
    """Step 3, through the stepped discriminator; ``fakes`` are consumed (each freed after its loss)."""
    p.zero_grad("G")
    p.requires_grad("D", False)
    losses = {}
    for g in groups:
        fake = fakes.pop(g)
        if p.recompute:
            fake = p.generate(g, again=True)
        out = p.discriminate(g, fake, real=False)
        losses[g] = p.backward(g, generator_loss(out, per_row=p.per_row), "generator", where)
    p.requires_grad("D", True)
    p.step("G")
    return losses


def iteration(p: Pieces, groups, where: tuple) -> tuple[dict, dict]:
    """Steps 1-3 for ``groups``; returns each group's recorded (L_D, L_G)."""
    fakes = generate_fakes(p, groups)
    return discriminator_step(p, groups, fakes, where), generator_step(p, groups, fakes, where)


def bce(out: torch.Tensor, target: float, *, per_row: bool = False) -> torch.Tensor:
    """BCE of D's logits against ``target`` (bf16 logits upcast first): the mean over the batch,
    or with ``per_row`` one mean per row of ``out`` (a batched engine's clients)."""
    out = for_loss(out)
    if per_row:
        out = out.flatten(1)
        return F.binary_cross_entropy_with_logits(out, torch.full_like(out, target), reduction="none").mean(1)
    return F.binary_cross_entropy_with_logits(out, torch.full_like(out, target))


def discriminator_loss(out_fake: torch.Tensor, out_real: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    """L_D: D's logits on the (detached) fakes against FAKE plus its logits on the real batch against REAL."""
    return bce(out_fake, FAKE, per_row=per_row) + bce(out_real, REAL, per_row=per_row)


def generator_loss(out_fake: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    """L_G: D's logits on the fakes (with their graph into G) against REAL."""
    return bce(out_fake, REAL, per_row=per_row)


def check_finite(values: list[float], clients, what: str, where: tuple) -> list[float]:
    """``values``, the ``what`` ("discriminator", "generator") losses of ``clients`` (one each), or
    one line of error naming the first that is NaN/inf; ``where`` is (round, epoch, iteration),
    0-based, and the message counts from 1, as the progress bar and metrics.jsonl do."""
    for client, v in zip(clients, values):
        if not math.isfinite(v):
            r, e, t = (k + 1 for k in where) if len(where) == 3 else ("?", "?", "?")
            raise HuscfError(f"{what} loss is not finite (NaN/inf) for client {client} at round {r}, "
                             f"epoch {e}, iteration {t}: lower train.lr or check the data")
    return values


def adam(params, train: TrainConfig, *, fused: bool, capturable: bool = False) -> torch.optim.Adam:
    """The optimiser of one segment (or of a bank of segments): Adam with ``train.lr`` and
    ``train.betas``. ``fused`` (CUDA: one kernel per step) and ``capturable`` (CUDA graphs) are
    kept as ``huscf_flags``, so that a checkpoint saved with other flags loads into this one's."""
    opt = torch.optim.Adam(list(params), lr=train.lr, betas=tuple(train.betas), fused=fused or None,
                           capturable=capturable)
    opt.huscf_flags = {"fused": fused or None, "capturable": capturable}
    return opt
