"""What one HuSCF-GAN iteration computes, written once: the engines decide where and in what order.

For the clients of an iteration (client i: its real batch (x_i, y_i), its noise z_i):

1. fake_i = G_i(z_i, y_i), through client i's head -> the server body -> client i's tail;
2. discriminator step: L_D,i = BCE(D_i(fake_i.detach(), y_i), FAKE) + BCE(D_i(x_i, y_i), REAL)
   (``discriminator_loss``); every client's loss is back-propagated, so the server's D blocks hold
   the sum of all clients' gradients, then each D optimiser (every client's, the server's) steps once;
3. generator step, D's weights frozen: L_G,i = BCE(D_i(fake_i, y_i), REAL) (``generator_loss``),
   back-propagated through D into G; then each G optimiser steps once.

BCE is ``binary_cross_entropy_with_logits``, the mean over the batch, computed at the client's
tail only (the server never sees a label, a loss or a decision). A loss that is not finite stops
the run with one line (``check_finite``). Every optimiser is Adam with the run's learning rate and
betas (``adam``). ``SimulationEngine`` runs the steps client by client, ``BatchedEngine`` for
stacks of clients at once (``per_row``: one loss per client), the Ray actors in phases across
processes; each takes its losses and optimisers from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from huscf.config import TrainConfig
from huscf.engines.execution import for_loss
from huscf.errors import HuscfError

FAKE, REAL = 0.0, 1.0  # the discriminator's targets


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


def non_finite_loss(client: int, what: str, where: tuple) -> HuscfError:
    """The one-line error for a NaN or infinite loss; ``where`` is (round, epoch, iteration), 0-based,
    and the message counts from 1, as the progress bar and metrics.jsonl do."""
    r, e, t = (k + 1 for k in where) if len(where) == 3 else ("?", "?", "?")
    return HuscfError(f"{what} loss is not finite (NaN/inf) for client {client} at round {r}, "
                      f"epoch {e}, iteration {t}: lower train.lr or check the data")


def check_finite(loss: torch.Tensor, client: int, what: str, where: tuple) -> None:
    """Raise ``non_finite_loss`` when client ``client``'s ``what`` ("discriminator", "generator") loss is NaN/inf."""
    if not torch.isfinite(loss):
        raise non_finite_loss(client, what, where)


def adam(params, train: TrainConfig, *, fused: bool, capturable: bool = False) -> torch.optim.Adam:
    """The optimiser of one segment (or of a bank of segments): Adam with ``train.lr`` and
    ``train.betas``. ``fused`` (CUDA: one kernel per step) and ``capturable`` (CUDA graphs) are
    kept as ``huscf_flags``, so that a checkpoint saved with other flags loads into this one's."""
    opt = torch.optim.Adam(list(params), lr=train.lr, betas=tuple(train.betas), fused=fused or None,
                           capturable=capturable)
    opt.huscf_flags = {"fused": fused or None, "capturable": capturable}
    return opt
