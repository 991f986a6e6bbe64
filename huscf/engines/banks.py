"""Weight banks: the clients' copies of one block stacked into one tensor per parameter.

Each client's ``Parameter`` is a view of its row of the bank (``Bank``), so the batched engine's
vmapped call reads the bank directly: nothing is stacked per iteration, and backward writes one
gradient per bank instead of one per client and parameter. The clients' Adam states stay per
parameter (a client that sits an iteration out does not step, and checkpoints keep the loop's
per-client format), but all clients of a net step in one optimiser call (one fused kernel on
CUDA); ``ClientAdam`` is one client's optimiser slot over that shared optimiser.
"""

from __future__ import annotations

import torch

from huscf.engines.simulation import place_step


class Bank:
    """Block b of one net for every client that holds its own copy: one stacked leaf tensor per
    parameter, whose row k is holder k's ``Parameter`` (a view: in-place averaging, loading and
    optimiser steps on a client's weights are writes into the bank)."""

    def __init__(self, holders: list[int], modules: list[torch.nn.Module]):
        self.holders = holders
        self.row = {c: k for k, c in enumerate(holders)}
        self.template = modules[0]
        self.names = [n for n, _ in modules[0].named_parameters()]
        self.params = [list(m.parameters()) for m in modules]  # params[k][j]: holder k's parameter j
        self.leaves = []
        for j in range(len(self.names)):
            leaf = torch.stack([ps[j].detach() for ps in self.params]).requires_grad_(True)
            for k, ps in enumerate(self.params):
                ps[j].data = leaf.data[k]
            self.leaves.append(leaf)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def weights(self, clients: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The stacked weights of ``clients`` (all holders: the bank itself; otherwise a gather)."""
        if clients == tuple(self.holders):
            return dict(zip(self.names, self.leaves))
        if clients not in self._index:
            self._index[clients] = torch.tensor([self.row[c] for c in clients], device=self.leaves[0].device)
        idx = self._index[clients]
        return {n: leaf[idx] for n, leaf in zip(self.names, self.leaves)}

    def zero_grad(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def requires_grad_(self, flag: bool) -> None:
        for leaf in self.leaves:
            leaf.requires_grad_(flag)

    def hand_out_grads(self, clients: set[int]) -> None:
        """Give each of ``clients`` its row of the bank's gradient (views, no copies)."""
        for j, leaf in enumerate(self.leaves):
            if leaf.grad is None:
                continue
            for k, c in enumerate(self.holders):
                if c in clients:
                    self.params[k][j].grad = leaf.grad[k]


class ClientAdam:
    """One client's optimiser slot over the net's shared Adam: the per-client ``state_dict`` of a
    ``torch.optim.Adam`` over that client's parameters (same layout, so checkpoints move between
    engines), stored in and stepped by the shared optimiser."""

    def __init__(self, shared: torch.optim.Adam, params: list[torch.nn.Parameter]):
        self.shared, self.params = shared, params

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        raise RuntimeError("client optimisers of the batched engine step together: use BatchedEngine._step")

    def state_dict(self) -> dict:
        group = {k: v for k, v in self.shared.param_groups[0].items() if k != "params"}
        state = {j: dict(self.shared.state[p]) for j, p in enumerate(self.params) if self.shared.state.get(p)}
        return {"state": state, "param_groups": [group | {"params": list(range(len(self.params)))}]}

    def load_state_dict(self, saved: dict) -> None:
        on_device = bool(self.shared.param_groups[0].get("fused") or self.shared.param_groups[0].get("capturable"))
        for j, p in enumerate(self.params):
            self.shared.state.pop(p, None)
            if j in saved["state"]:
                self.shared.state[p] = {
                    k: place_step(v, p, on_device) if k == "step" else v.to(device=p.device, dtype=p.dtype)
                    for k, v in saved["state"][j].items()}
