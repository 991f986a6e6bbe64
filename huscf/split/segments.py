"""Client segments and the server body, built from one template G/D and every client's cuts.

``SplitGAN`` holds, for each client, the head and tail blocks it computes (its own copies) and
one ``server`` copy of every middle block of G and D, shared by all clients whose activations
pass through it. All copies start from the same template weights (one initialisation broadcast
to everyone, as in FedAvg).

Server-side BatchNorm: the server runs each client's activations through its blocks separately,
so BatchNorm statistics are computed per client, never over a mix of clients. A client's forward
pass therefore equals the unsplit network's forward on that client's batch (tested), no client's
normalisation depends on another client's data, and a server block behaves the same whether a
client runs it locally or the server runs it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from huscf.models.blocks import BlockNet, run_tail_block
from huscf.split.plan import Cuts, SegmentRange, segment_ranges
from huscf.split.seam import Seam

NETS = ("G", "D")


def _copies(g: BlockNet, d: BlockNet, blocks) -> nn.ModuleDict:
    """Own copies of G's and D's blocks ``blocks(name, net)``: ``[name][str(b)]``."""
    return nn.ModuleDict({name: nn.ModuleDict({str(b): copy.deepcopy(net.blocks[b]) for b in blocks(name, net)})
                          for name, net in (("G", g), ("D", d))})


def _chain(blocks: nn.ModuleDict, h: torch.Tensor, indices) -> torch.Tensor:
    """Blocks ``indices`` of ``blocks`` (keyed by index), in order, on ``h``."""
    for b in indices:
        h = blocks[str(b)](h)
    return h


class ClientSegments(nn.Module):
    """The blocks one client holds, keyed by block index: ``self.nets["G"][str(b)]``."""

    def __init__(self, cuts: Cuts, g: BlockNet, d: BlockNet):
        super().__init__()
        self.cuts = cuts
        self.ranges = {"G": segment_ranges(cuts.hg, cuts.tg, g.num_middle),
                       "D": segment_ranges(cuts.hd, cuts.td, d.num_middle)}
        self.nets = _copies(g, d, lambda name, net: (*self.ranges[name].head, *self.ranges[name].tail))

    def holds(self, net: str, block: int) -> bool:
        return str(block) in self.nets[net]

    def sends(self, net: str) -> bool:
        """Whether this client's ``net`` passes through the server (False for whole-network cuts)."""
        return bool(self.ranges[net].server)

    def run_head(self, net: str, inputs: tuple) -> torch.Tensor:
        """Blocks 0..head of ``net`` on the client's own copies (block 0 takes the label)."""
        return _chain(self.nets[net], self.nets[net]["0"](*inputs), self.ranges[net].head[1:])

    def run_tail(self, net: str, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The tail blocks of ``net`` (those after the server's); the last takes the label ``y``
        when it takes one (``model.labels: tail``)."""
        *rest, last = self.ranges[net].tail
        return run_tail_block(self.nets[net][str(last)], _chain(self.nets[net], h, rest), y)


class ServerBody(nn.Module):
    """One copy of every middle block of G and D."""

    def __init__(self, g: BlockNet, d: BlockNet):
        super().__init__()
        self.nets = _copies(g, d, lambda name, net: range(1, net.num_middle + 1))

    def run(self, net: str, h: torch.Tensor, blocks) -> torch.Tensor:
        """The server's copies of ``blocks`` of ``net``, in order."""
        return _chain(self.nets[net], h, blocks)


class SplitGAN(nn.Module):
    """All clients' segments plus the shared server body, and the U-shaped forward pass."""

    def __init__(self, g: BlockNet, d: BlockNet, cuts: list[Cuts], cluster_bodies: int = 0):
        """``cluster_bodies``: that many extra server bodies (``federation.server_body: per_cluster``);
        ``body_of[i]`` is the one client i runs through (-1: ``server``, the shared body)."""
        super().__init__()
        self.num_blocks = {"G": len(g.blocks), "D": len(d.blocks)}
        self.clients = nn.ModuleList([ClientSegments(c, g, d) for c in cuts])
        self.server = ServerBody(g, d)
        self.cluster_bodies = nn.ModuleList([ServerBody(g, d) for _ in range(cluster_bodies)])
        if cluster_bodies:  # in the state dict (checkpoints) only when there are cluster bodies
            self.register_buffer("body_of", torch.full((len(cuts),), -1, dtype=torch.long))
        self.seam = Seam()
        self.tied: set[str] = set()  # the nets of which all clients share one copy (``tie``)

    def body(self, client: int) -> ServerBody:
        """The server body client ``client`` runs through."""
        k = int(self.body_of[client]) if len(self.cluster_bodies) else -1
        return self.server if k < 0 else self.cluster_bodies[k]

    def server_bodies(self) -> list[ServerBody]:
        """The shared body, then the cluster bodies."""
        return [self.server, *self.cluster_bodies]

    @torch.no_grad()
    def load_ends(self, nets: dict[str, BlockNet]) -> None:
        """Every client's first and last block of each net from ``nets`` (a fresh G and D): the start
        of ``federation.hide_ends``, where they are drawn from a secret seed the server does not
        hold, so it cannot know the ends even as they started. Every client holds its ends."""
        for net, fresh in nets.items():
            for b in (0, self.num_blocks[net] - 1):
                for seg in self.clients:
                    seg.nets[net][str(b)].load_state_dict(fresh.blocks[b].state_dict())

    def server_requires_grad_(self, net: str, flag: bool) -> None:
        """Train (or freeze) ``net``'s blocks in every server body."""
        for body in self.server_bodies():
            body.nets[net].requires_grad_(flag)

    def tie(self, net: str) -> None:
        """Make every client's ``net`` blocks the same modules as client 0's: one copy of the net
        that all clients' passes run through (MD-GAN's server-side G). Needs identical cuts."""
        for c in self.clients[1:]:
            if c.cuts != self.clients[0].cuts:
                raise ValueError(f"tying {net} needs identical cuts on every client")
            c.nets[net] = self.clients[0].nets[net]
        self.tied.add(net)

    @property
    def latent(self) -> tuple[int, int]:
        """(z_dim, num_classes) of the generator's input, read off its first block (a client's)."""
        head = self.clients[0].nets["G"]["0"]
        return head.z_dim, head.num_classes

    @property
    def cuts(self) -> list[Cuts]:
        return [c.cuts for c in self.clients]

    def ranges(self, client: int, net: str) -> SegmentRange:
        return self.clients[client].ranges[net]

    def forward_net(self, net: str, client: int, inputs: tuple, server_input: list | None = None) -> torch.Tensor:
        """Head (client) -> seam -> body (server) -> seam -> tail (client) for one client.

        When ``server_input`` is a list, the activation the server received is appended to it
        (detached): the server's own view, used for clustering at the end of a round.
        """
        seg, r = self.clients[client], self.ranges(client, net)
        h = seg.run_head(net, inputs)
        if r.server:  # a client that holds the whole network (a non-split baseline) sends nothing
            h = self.seam.cross(h, "client->server", client, net, r.head[-1])
            if server_input is not None:
                server_input.append(h.detach())
            h = self.body(client).run(net, h, r.server)
            h = self.seam.cross(h, "server->client", client, net, r.server[-1])
        return seg.run_tail(net, h, inputs[1])

    def generate(self, client: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_net("G", client, (z, y))

    def discriminate(self, client: int, x: torch.Tensor, y: torch.Tensor,
                     server_input: list | None = None) -> torch.Tensor:
        return self.forward_net("D", client, (x, y), server_input)

    def client_parameters(self, client: int, net: str):
        return self.clients[client].nets[net].parameters()

    def server_parameters(self, net: str):
        return [p for body in self.server_bodies() for p in body.nets[net].parameters()]

    def assemble(self, client: int, net: str) -> BlockNet:
        """A standalone copy of client ``client``'s full network (its blocks + the server's)."""
        own, body = self.clients[client].nets[net], self.body(client).nets[net]
        blocks = [copy.deepcopy(own[str(b)] if str(b) in own else body[str(b)]) for b in range(self.num_blocks[net])]
        return BlockNet(blocks)

    @torch.no_grad()
    def server_features(self, inputs: dict[int, torch.Tensor], depth: int) -> dict[int, torch.Tensor]:
        """The server's D activation after block ``depth`` for the given clients.

        ``inputs[i]`` is the activation client i sent to the server. The server pushes it through
        its own copies of blocks ``hd_i+1 .. depth``, so every client's features come from the same
        weights at the same depth whatever its cuts. BatchNorm uses batch statistics, exactly as in
        the training forward pass (the GANs keep no running statistics, so nothing is mutated).
        """
        return {client: self.server.run("D", h, range(self.ranges(client, "D").head[-1] + 1, depth + 1))
                for client, h in inputs.items()}


def server_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server's entries of a ``SplitGAN`` state dict: its bodies and ``body_of``, no client's."""
    return {k: v for k, v in state.items() if not k.startswith("clients.")}
