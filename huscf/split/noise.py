"""Clipping and Gaussian noise on what a client sends the server (``privacy.seam_noise``).

A client sends two things across the seam, and both are clipped and noised on the client before
they leave (the one-process engines' ``Seam`` and the Ray client host):

* every activation, row by row (one row per sample): clipped to the L2 norm
  ``C = seam_clip * sqrt(elements per row)``, then Gaussian noise of standard deviation
  ``seam_noise * C`` per element; the client back-propagates through the clipping, the noise being
  a constant;
* every gradient it returns for the server's output (its tail's gradient, which the server
  back-propagates through its body): the gradient of the batch's *summed* loss, row by row (the
  mean's gradient times the batch's rows, so that the clip does not depend on the batch size),
  clipped to ``C_g = seam_grad_clip * sqrt(elements per row)``, noised with standard deviation
  ``seam_noise * C_g`` per element, and divided by the rows again.

The privacy unit is one training record (an image and its label). Each iteration a client sends,
per batch holding the record, ``RELEASES_PER_ITERATION`` tensors computed from it: 5 activations
(the G head on its labels in steps 1 and 3, the D head on the real rows and on the fakes of their
labels in step 2, and on the fakes again in step 3) and 4 gradients (the D tail's on the real rows
and on the fakes in step 2, on the fakes in step 3, and the G tail's in step 3). A record changes
more than its own row: the heads and tails normalise over the batch (BatchNorm), so every row of
its batch may move. Each release is therefore counted as the whole batch's tensor, whose B rows
each lie in a ball of radius C: L2 sensitivity ``2 C sqrt(B)``, a noise multiplier of
``seam_noise / (2 sqrt(B))``. A record is in one batch per local epoch, or in
``ceil(iterations / its client's batches)`` when a method makes clients start their batches over
(``Engine.equal_steps``). ``epsilon`` composes all of a run's releases of one record with Google's
``dp_accounting`` (its Renyi-DP accountant), without amplification by subsampling. For these
compositions the Renyi bound is 2-10% above the exact epsilon of the composed Gaussian mechanism
(tests/test_seam_noise.py), and takes milliseconds; the accountant on privacy-loss distributions
is tighter but took minutes per round at the small noise levels measured.

What the epsilon does not cover: the weights. At each round end the server learns every client's
head and tail (plain averaging) or each cluster's average of them (secure aggregation), neither
clipped nor noised (docs/security.md).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

ACTIVATIONS_PER_ITERATION, GRADIENTS_PER_ITERATION = 5, 4
RELEASES_PER_ITERATION = ACTIVATIONS_PER_ITERATION + GRADIENTS_PER_ITERATION
"""Tensors computed from one record's batch that a client sends in one iteration, at most (see above)."""


@dataclass
class SeamNoise:
    """Per-row clipping to ``clip * sqrt(d)`` and N(0, (multiplier * clip * sqrt(d))^2) noise on
    activations; ``gradient`` the same with ``grad_clip`` on the gradients a client returns."""

    multiplier: float
    clip: float
    seed: int
    grad_clip: float = 0.01
    _epoch: tuple[int, int] = (0, 0)
    _generators: dict = field(default_factory=dict, repr=False)

    def at(self, round_idx: int, epoch: int) -> None:
        """Start the draws of one local epoch: they follow from (seed, round, epoch) alone, so a run
        resumed from a checkpoint draws what the uninterrupted run drew."""
        self._epoch = (round_idx, epoch)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:  # one stream per device and epoch
            round_idx, epoch = self._epoch
            key = hashlib.sha256(f"huscf seam noise {self.seed} {round_idx} {epoch}".encode()).digest()
            seed = int.from_bytes(key[:8], "little") >> 1
            self._generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[device]

    @classmethod
    def of(cls, privacy, seed: int, stream: int = 0) -> "SeamNoise | None":
        """The noise of a run's ``privacy`` config section, None when ``seam_noise`` is 0. ``seed``:
        the run's, kept apart from its other streams; ``stream`` tells processes apart (each Ray
        client host draws its own)."""
        if privacy.seam_noise <= 0:
            return None
        return cls(privacy.seam_noise, privacy.seam_clip, (seed * 1_000_003 + 0x5EA + stream * 7_919) % 2**63,
                   privacy.seam_grad_clip)

    def _clipped(self, flat: torch.Tensor, clip: float | None = None) -> tuple[torch.Tensor, float]:
        """The rows of ``flat`` clipped to the norm ``clip * sqrt(d)`` (default: the activations'), and the norm."""
        norm = (self.clip if clip is None else clip) * math.sqrt(flat.shape[-1])
        scale = (norm / flat.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return flat * scale.to(flat.dtype), norm

    def clipped(self, x: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``x`` with each row clipped, without noise: the rule an attacker who knows the config applies."""
        return self._clipped(x.flatten(lead))[0].view_as(x)

    def __call__(self, x: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``x`` with each row clipped and noised; a row is everything after the first ``lead``
        dimensions (1: a client's batch; 2: the batched engine's clients x batch)."""
        flat, norm = self._clipped(x.flatten(lead))
        return self._noised(flat, norm).view_as(x)

    def _noised(self, flat: torch.Tensor, norm: float) -> torch.Tensor:
        noise = torch.randn(flat.shape, generator=self._generator(flat.device), device=flat.device,
                            dtype=torch.float32)
        return flat + (noise * (self.multiplier * norm)).to(flat.dtype)

    def _summed_loss_rows(self, g: torch.Tensor, lead: int) -> tuple[torch.Tensor, float, int]:
        """``g`` (the gradient of a batch's mean loss) as the summed loss's rows, each clipped to
        ``grad_clip * sqrt(d)``; the norm; the batch's rows (dimension ``lead - 1``)."""
        rows = g.shape[lead - 1]
        flat, norm = self._clipped(g.flatten(lead) * rows, self.grad_clip)
        return flat, norm, rows

    def clipped_gradient(self, g: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``g`` (the gradient of a batch's mean loss) with each row's summed-loss gradient clipped,
        without noise: what ``gradient`` sends, less the noise."""
        flat, _, rows = self._summed_loss_rows(g, lead)
        return (flat / rows).view_as(g)

    def gradient(self, g: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``g``, a gradient a client returns for the server's output (of the batch's mean loss),
        clipped and noised row by row as the gradient of the batch's summed loss: rows times ``g``,
        clipped to ``grad_clip * sqrt(d)``, noised, divided by the rows again. ``lead`` as in
        ``__call__``; the rows are dimension ``lead - 1`` (a client's batch)."""
        flat, norm, rows = self._summed_loss_rows(g, lead)
        return (self._noised(flat, norm) / rows).view_as(g)


def batches_per_epoch(iterations: int, client_batches: list[int], start_over: bool) -> int:
    """In how many of an epoch's ``iterations`` batches one record can be, at most: 1, or with
    ``start_over`` (``Engine.equal_steps``: a client past its last batch starts again) the most
    times any client's batches come round, ``ceil(iterations / batches)``."""
    if not start_over:
        return 1
    return max(math.ceil(iterations / max(1, b)) for b in client_batches)


def releases_per_record(rounds: int, local_epochs: int, batches: int = 1) -> int:
    """How many tensors computed from one record's batch a client sends in a run, at most, when a
    record is in ``batches`` batches per local epoch (``batches_per_epoch``)."""
    return RELEASES_PER_ITERATION * rounds * local_epochs * batches


def epsilon(multiplier: float, releases: int, delta: float, batch_size: int = 1) -> float:
    """The (epsilon, ``delta``)-DP guarantee of ``releases`` Gaussian releases of one record, each a
    batch of ``batch_size`` rows clipped to a norm C (L2 sensitivity ``2 C sqrt(batch_size)``: every
    row may move) with noise ``multiplier`` times C per element (``dp_accounting``'s Renyi-DP
    accountant)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(multiplier / (2 * math.sqrt(batch_size))), releases)
    accountant = RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
