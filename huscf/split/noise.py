"""Clipping and Gaussian noise on what a client sends the server (``privacy.seam_noise``).

Every activation a client sends across the seam is, row by row (one row per sample), clipped to
the L2 norm ``C = seam_clip * sqrt(elements per row)`` and given Gaussian noise of standard
deviation ``seam_noise * C`` per element, on the client, before it leaves. The server (its body,
its clustering features, an attacker) sees only the noisy rows; the client back-propagates
through the clipping, the noise being a constant. Applied where tensors leave a client: the
one-process engines' ``Seam`` and the Ray client host.

The privacy unit is one training record (an image and its label). A record is in one batch per
local epoch, and each iteration sends at most ``RELEASES_PER_ITERATION`` rows computed from it
(the G head on its label in steps 1 and 3, the D head on the real row and on the fake row of its
label in step 2, and on the fake row again in step 3). Each release is a Gaussian mechanism with
L2 sensitivity 2C (any two rows in the ball of radius C differ by at most 2C), so its noise
multiplier is ``seam_noise / 2``; ``epsilon`` composes all of a run's releases of one record with
Google's ``dp_accounting`` (its Renyi-DP accountant), without amplification by subsampling. For
these compositions the Renyi bound is 2-10% above the exact epsilon of the composed Gaussian
mechanism (tests/test_seam_noise.py), and takes milliseconds; the accountant on privacy-loss
distributions is tighter but took minutes per round at the small noise levels measured.

What the epsilon does not cover: the weights. At each round end the server learns every client's
head and tail (plain averaging) or each cluster's average of them (secure aggregation), neither
clipped nor noised (docs/security.md).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

RELEASES_PER_ITERATION = 5
"""Rows computed from one record that a client sends in one iteration, at most (see above)."""


@dataclass
class SeamNoise:
    """Per-row clipping to ``clip * sqrt(d)`` and N(0, (multiplier * clip * sqrt(d))^2) noise."""

    multiplier: float
    clip: float
    seed: int
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
        return cls(privacy.seam_noise, privacy.seam_clip, (seed * 1_000_003 + 0x5EA + stream * 7_919) % 2**63)

    def _clipped(self, flat: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The rows of ``flat`` clipped to the norm, and the norm."""
        norm = self.clip * math.sqrt(flat.shape[-1])
        scale = (norm / flat.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return flat * scale.to(flat.dtype), norm

    def clipped(self, x: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``x`` with each row clipped, without noise: the rule an attacker who knows the config applies."""
        return self._clipped(x.flatten(lead))[0].view_as(x)

    def __call__(self, x: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``x`` with each row clipped and noised; a row is everything after the first ``lead``
        dimensions (1: a client's batch; 2: the batched engine's clients x batch)."""
        flat, norm = self._clipped(x.flatten(lead))
        noise = torch.randn(flat.shape, generator=self._generator(x.device), device=x.device, dtype=torch.float32)
        return (flat + (noise * (self.multiplier * norm)).to(flat.dtype)).view_as(x)


def releases_per_record(rounds: int, local_epochs: int) -> int:
    """How many rows computed from one record a client sends in a run, at most."""
    return RELEASES_PER_ITERATION * rounds * local_epochs


def epsilon(multiplier: float, releases: int, delta: float) -> float:
    """The (epsilon, ``delta``)-DP guarantee of ``releases`` Gaussian releases of one record, each
    with noise ``multiplier`` times its clip norm (``dp_accounting``'s Renyi-DP accountant)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier / 2), releases)
    accountant = RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
