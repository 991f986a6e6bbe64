"""The seam: the one place tensors cross between a client and the server.

Every activation a client sends to the server (and every activation the server returns) passes
through ``Seam.cross``. In the simulation engine this is an identity autograd function, so the
split model computes exactly what the unsplit model computes, and the matching gradients cross
back through the same function on the backward pass. With a ``SeamRecorder`` attached, every
crossing (both directions, forward and backward) is logged: the privacy test inspects it.
With ``noise`` set (``privacy.seam_noise``, ``noise.SeamNoise``), what a client sends is clipped
and noised before it crosses, so the recorder and the server see the noisy rows: its activations
on the way in, and the gradients it returns for what the server sent it on the way back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from huscf.split.noise import SeamNoise


@dataclass
class Crossing:
    """One tensor that crossed the network."""

    kind: str  # "activation" or "gradient"
    direction: str  # "client->server" or "server->client"
    client: int
    net: str  # "G" or "D"
    block: int  # index of the block whose output this is (or whose output's gradient)
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    tensor: torch.Tensor | None = None  # kept only when the recorder captures tensors


@dataclass
class SeamRecorder:
    """Collects every crossing; ``capture=True`` also keeps a detached copy of each tensor."""

    capture: bool = False
    crossings: list[Crossing] = field(default_factory=list)

    def record(self, kind: str, direction: str, client: int, net: str, block: int, t: torch.Tensor) -> None:
        self.crossings.append(Crossing(kind, direction, client, net, block, tuple(t.shape),
                                       str(t.dtype).removeprefix("torch."), t.numel() * t.element_size(),
                                       t.detach().clone() if self.capture else None))


class _Cross(torch.autograd.Function):
    """Identity that records ``x[part]`` as client ``clients[k]``'s crossing for every ``parts[k]``
    (``...`` for a tensor that is one client's; a row index for the batched engine's stacks)."""

    @staticmethod
    def forward(ctx, x, recorder, direction, clients, parts, net, block):
        ctx.meta = (recorder, direction, clients, parts, net, block)
        for client, part in zip(clients, parts):
            recorder.record("activation", direction, client, net, block, x[part])
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        recorder, direction, clients, parts, net, block = ctx.meta
        back = "server->client" if direction == "client->server" else "client->server"
        for client, part in zip(clients, parts):
            recorder.record("gradient", back, client, net, block, grad[part])
        return grad, None, None, None, None, None, None


class _NoisedGradient(torch.autograd.Function):
    """Identity whose backward clips and noises the gradient (``SeamNoise.gradient``), in the
    rows ``rows`` only when given (the batched engine's stacks, ``lead`` 2)."""

    @staticmethod
    def forward(ctx, x, noise, lead, rows):
        ctx.meta = (noise, lead, rows)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        noise, lead, rows = ctx.meta
        if rows is None:
            return noise.gradient(grad, lead), None, None, None
        index = torch.tensor(rows, device=grad.device)
        return grad.index_copy(0, index, noise.gradient(grad.index_select(0, index), lead)), None, None, None


class Seam:
    """Moves tensors across the client/server boundary (identity in one process)."""

    def __init__(self) -> None:
        self.recorder: SeamRecorder | None = None
        self.noise: SeamNoise | None = None

    def cross(self, x: torch.Tensor, direction: str, client: int, net: str, block: int) -> torch.Tensor:
        if self.noise is not None and direction == "client->server":
            x = self.noise(x)
        if self.recorder is not None:
            x = _Cross.apply(x, self.recorder, direction, [client], [...], net, block)
        if self.noise is not None and direction == "server->client" and x.requires_grad:
            # applied after the recorder: its backward runs first, so the recorder logs the noised gradient
            x = _NoisedGradient.apply(x, self.noise, 1, None)
        return x

    def cross_rows(self, x: torch.Tensor, direction: str, clients: list[int], rows: list[int], net: str,
                   block: int) -> torch.Tensor:
        """``cross`` for the batched engine: row ``rows[k]`` of ``x`` is client ``clients[k]``'s tensor."""
        if self.noise is not None and direction == "client->server" and rows:
            index = torch.tensor(rows, device=x.device)
            x = x.index_copy(0, index, self.noise(x.index_select(0, index), lead=2))
        if self.recorder is not None and rows:
            x = _Cross.apply(x, self.recorder, direction, clients, rows, net, block)
        if self.noise is not None and direction == "server->client" and rows and x.requires_grad:
            x = _NoisedGradient.apply(x, self.noise, 2, list(rows))
        return x
