"""What every actor of the Ray runtime builds its part from (``RunSpec``), and what each hosted
client's messages may carry (``contracts``); ``host.py`` and ``server.py`` are the two kinds of
actor, ``driver.py`` makes them actors and runs the iteration's phases on them."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from huscf.config import RunConfig
from huscf.engines.execution import Execution
from huscf.methods import Method, method_names, register
from huscf.models.cgan import Architecture
from huscf.runtime.messages import ClientContract
from huscf.split.plan import Cuts
from huscf.split.segments import NETS, ClientSegments


@dataclass(frozen=True)
class RunSpec:
    """What every actor builds its part from: the config, the architecture and the cuts (no data)."""

    config: dict
    arch: Architecture
    cuts: tuple[Cuts, ...]
    sizes: tuple[int, ...]
    feature_depth: int | None
    threads: int
    # the run's method class: an actor registers it when its process does not know it yet (a method
    # defined outside huscf, e.g. a user's or a test's), before the config names it
    method: type[Method] | None = None

    def setup(self) -> tuple[RunConfig, Execution, torch.nn.Module, torch.nn.Module]:
        torch.set_num_threads(self.threads)
        if self.method is not None and self.method.name not in method_names(ablations=True):
            register(self.method)
        cfg = RunConfig.model_validate(self.config)
        ex = Execution.from_config(cfg.compute, len(self.cuts), per_client_loop=True)
        torch.manual_seed(cfg.seed)  # the same initialisation as the driver's and every other process's
        return cfg, ex, self.arch.generator(), self.arch.discriminator()


@torch.no_grad()
def _out_shapes(net: torch.nn.Module, inputs: tuple) -> list[tuple[int, ...]]:
    """The per-sample output shape of every block of a block list, from one forward of 2 samples."""
    net = net.to("cpu").train()
    h, shapes = inputs, []
    for b in range(len(net.blocks)):
        h = net.run(b, b + 1, h, inputs[1])  # the label for a tail block that takes it
        shapes.append(tuple(h.shape[1:]))
    return shapes


def contracts(segs: dict[int, ClientSegments], g, d, arch: Architecture) -> dict[int, ClientContract]:
    """What each hosted client's messages may carry (``messages.ClientContract``), from its cuts:
    the head's output crosses forward, the gradient of the server's last block's output back."""
    y = torch.zeros(2, dtype=torch.long)
    out = {"G": _out_shapes(copy.deepcopy(g), (torch.randn(2, arch.z_dim), y)),
           "D": _out_shapes(copy.deepcopy(d), (torch.zeros(2, *arch.image_shape), y))}
    contracts = {}
    for i, seg in segs.items():
        cut = {}
        for net in NETS:
            r = seg.ranges[net]
            if r.server:
                cut[("activation", net)] = out[net][r.head[-1]]
                cut[("gradient", net)] = out[net][r.server[-1]]
        contracts[i] = ClientContract(
            cut=cut, segment={f"clients.{i}.{k}": tuple(v.shape) for k, v in seg.state_dict().items()},
            opt_params={net: [tuple(p.shape) for p in seg.nets[net].parameters()] for net in NETS},
            block_sizes={f"{net}/{b}": sum(v.numel() for v in block.state_dict().values() if v.is_floating_point())
                         for net in NETS for b, block in seg.nets[net].items()})
    return contracts




def leaf(t: torch.Tensor) -> torch.Tensor:
    """A received tensor as the start of this process's graph: its gradient is what goes back."""
    return t.detach().requires_grad_(True)
