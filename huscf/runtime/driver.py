"""``RayEngine``: the driver of the Ray runtime. It starts (or joins) Ray, places the client hosts
and the server actor, and runs the simulation engine's epochs and round ends across them; it holds
no client's training data.

The driver only orchestrates: it sends control messages and the iteration's latent noise, collects
scalar losses, and at the end of each round collects every actor's state for the run's checkpoint
(and the driver's mirror of the model, which the trainer's monitoring samples from).

Faults: a client host that dies or does not answer within ``runtime.call_timeout_s`` is recorded,
the round finishes with the other clients and the aggregation renormalises over them; with
``runtime.on_failure: restart`` its clients come back next round in a new actor from the last
aggregated weights, with ``drop`` they leave the run. Stragglers: see ``runtime.deadline_s``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from huscf.engines.execution import precision_dtype
from huscf.engines.precision import choose_precision
from huscf.engines.simulation import EpochLosses, check_given, epoch_iterations, epoch_noise
from huscf.errors import HuscfError
from huscf.federation.strategies import Aggregation
from huscf.methods import get_method
from huscf.runtime.host import ClientHost
from huscf.runtime.server import ServerNode
from huscf.runtime.spec import RunSpec
from huscf.runtime.cluster import connect, disconnect
from huscf.runtime.messages import Message, Wire, pack_state, unpack_state
from huscf.split.segments import SplitGAN, server_state


def plan_hosts(num_clients: int, clients_per_actor: int | str, cpus: int) -> list[list[int]]:
    """Split clients 0..n-1 into contiguous groups, one group per client actor (``auto``: spread
    over CPUs - 1 actors, at least one, at most one per client: with the server actor, one actor
    per CPU)."""
    if clients_per_actor == "auto":
        hosts = min(num_clients, max(1, cpus - 1))
        per = math.ceil(num_clients / hosts)
    else:
        per = int(clients_per_actor)
    return [list(range(s, min(s + per, num_clients))) for s in range(0, num_clients, per)]


def actor_threads(threads_per_actor: int | str, cpus: int, actors: int) -> int:
    """Torch threads in each actor (``auto``: CPUs // actors, at least one). Client actors work at
    once and the server's calls interleave with theirs, so threads x actors <= CPUs keeps a run from
    oversubscribing its cores (issue 31: spinning OpenMP threads on shared cores cost 4x); where
    there are more actors than CPUs, one thread each is the least there is."""
    return int(threads_per_actor) if threads_per_actor != "auto" else max(1, cpus // actors)


class RayEngine:
    """An ``Engine`` (engines/protocol.py) on Ray: epochs, round-end federation, state."""

    def __init__(self, cfg, model: SplitGAN, *, arch, sizes: list[int], feature_depth: int | None,
                 run_dir: Path):
        if model.tied:
            raise HuscfError(f"method {cfg.method!r} gives all clients one copy of {'/'.join(sorted(model.tied))}, "
                             f"which the ray engine does not place: use runtime.engine=simulation")
        self.cfg, self.model, self.sizes = cfg, model, list(sizes)
        self.batch_size, self.z_dim, self.seed = cfg.train.batch_size, arch.z_dim, cfg.seed
        self.max_iters, self.feature_depth = cfg.train.max_iters_per_epoch, feature_depth
        self.device = torch.device("cpu")  # the driver's mirror, for monitoring samples
        model.to(dtype=precision_dtype(cfg.compute.precision))  # in the dtype the actors train in
        self.audit_path = Path(run_dir) / "audit.jsonl"
        rt = cfg.runtime
        self.ray, self._owns_ray, cpus = connect(rt.address)
        self.groups = plan_hosts(len(sizes), rt.clients_per_actor, cpus)
        threads = actor_threads(rt.threads_per_actor, cpus, len(self.groups) + 1)
        self.placement = (f"ray: {len(self.groups)} client actor{'s' if len(self.groups) > 1 else ''} + server, "
                          f"{threads} thread{'s' if threads > 1 else ''} each on {cpus} CPUs")
        config = cfg.model_dump(mode="json")
        if cfg.compute.precision == "auto":  # chosen once, here: actors on different nodes must agree
            device = cfg.compute.device if cfg.compute.device != "auto" else (
                "cuda" if torch.cuda.is_available() else "cpu")
            config["compute"]["precision"] = choose_precision("auto", device)[0]
        self.spec = RunSpec(config, arch, tuple(model.cuts), tuple(self.sizes), feature_depth, threads,
                            type(get_method(cfg.method)))
        self.wire = Wire("driver")
        self.server = self.ray.remote(ServerNode).options(
            num_cpus=0, resources=dict(rt.server_resources) or None, max_concurrency=1).remote(self.spec)
        self.hosts: dict[int, object] = {}  # group index -> actor handle, for the groups in the run
        self.dropped: set[int] = set()
        self._roster: dict[int, str] = {}  # secure aggregation: every client's enrolled identity key
        for k in range(len(self.groups)):
            self.hosts[k] = self._start_host(k)
        self._check_sizes()
        self._last_state = self._collect_state()
        if cfg.federation.hide_ends:  # the hosts start from the driver's secret ends, not the public seed's
            state = dict(self._last_state)
            state["model"] = state["model"] | {k: v for k, v in model.state_dict().items() if k.startswith("clients.")}
            self.load_state_dict(state)
        self.after_iteration = []  # callables (round, epoch, t): monitoring and fault-injection tests
        self.before_masking = []  # callables (round): fault injection in a secure round end (tests)
        self._events = self._no_events()
        self._given: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ``give``: for the next epoch
        self.equal_steps = False  # ``Engine.equal_steps``: the hosts start a client's batches over

    @property
    def fake_inputs(self) -> None:
        """``Engine.fake_inputs``: here always each client's own noise and labels."""
        return None

    @fake_inputs.setter
    def fake_inputs(self, plan) -> None:
        if plan is not None:
            raise HuscfError(f"method {self.cfg.method!r} draws the fakes' noise and labels itself, which the ray "
                             f"engine does not support: use runtime.engine=simulation")

    # -- actors ------------------------------------------------------------------------------------
    def _start_host(self, k: int):
        rt = self.cfg.runtime
        return self.ray.remote(ClientHost).options(
            num_cpus=0, resources=dict(rt.client_resources) or None, name=None,
        ).remote(self.spec, self.groups[k], self.server, k)

    def _check_sizes(self) -> None:
        got = {}
        for k in self.hosts:
            got.update({int(i): n for i, n in self._call(self.hosts[k].sizes.remote(), "startup").items()})
        bad = [i for i, n in got.items() if n != self.sizes[i]]
        if bad:
            raise HuscfError(f"client {bad[0]} loaded {got[bad[0]]} training samples, the driver planned "
                             f"{self.sizes[bad[0]]}: every node needs the same copy of the dataset")

    def host_pids(self) -> dict[int, int]:
        """Process id of each live client actor (group index -> pid)."""
        return {k: self._call(h.pid.remote(), "pid") for k, h in self.hosts.items()}

    def _call(self, ref, what: str, tolerate: bool = False):
        """``ray.get`` with the runtime's timeout. An error raised inside an actor comes back as one
        line; a dead or silent actor too, unless ``tolerate`` (then the caller handles it)."""
        ray = self.ray
        try:
            return ray.get(ref, timeout=self.cfg.runtime.call_timeout_s)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, HuscfError):
                raise HuscfError(str(cause)) from None
            if isinstance(cause, ray.exceptions.RayActorError):
                raise HuscfError(f"the server actor failed during {what} ({type(cause).__name__}): the run "
                                 f"keeps its finished rounds; continue with huscf train --resume RUN_DIR") from None
            raise HuscfError(f"an actor failed during {what}: {type(cause).__name__}: {cause}") from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            if tolerate:
                raise
            last = next((line for line in reversed(str(err).splitlines()) if line.strip()), "")
            raise HuscfError(f"an actor died or did not answer during {what} ({type(err).__name__}: {last.strip()}); "
                             f"finished rounds are kept: continue with huscf train --resume RUN_DIR") from None

    def _gather(self, refs: dict[int, object], where: tuple) -> dict[int, object]:
        """Results of one call per client host; a host that died or timed out is recorded and
        leaves the round (its clients with it)."""
        ray, out = self.ray, {}
        for k, ref in refs.items():
            try:
                out[k] = self._call(ref, f"round {where[0] + 1}", tolerate=True)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                self._fail(k, where, type(err).__name__)
        return out

    def _fail(self, k: int, where: tuple, error: str) -> None:
        r, e, t = where
        self._events["failures"].append({"actor": k, "clients": self.groups[k], "round": r + 1, "epoch": e + 1,
                                         "iteration": t, "error": error})
        self._failed.add(k)
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(self.hosts[k])

    # -- epochs ------------------------------------------------------------------------------------
    def give(self, data: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``Engine.give``: the samples travel to the client's actor with the next epoch's start
        (message kind ``given``, in the audit)."""
        for i, (x, y) in check_given(data, len(self.sizes), self.spec.arch.image_shape).items():
            self._given[i] = (x.detach().cpu(), y.detach().cpu())

    def batches_per_client(self) -> list[int]:
        return [max(1, (n + len(self._given.get(i, ((), ()))[1])) // self.batch_size)
                for i, n in enumerate(self.sizes)]

    def iterations_per_epoch(self) -> int:
        return epoch_iterations(self.batches_per_client(), self.max_iters)

    def _live(self) -> dict[int, object]:
        return {k: h for k, h in self.hosts.items() if k not in self._failed}

    def _no_events(self) -> dict:
        self._failed: set[int] = set()
        self._done = np.zeros(len(self.sizes), dtype=int)
        return {"failures": [], "skipped_iterations": {}}

    def run_epoch(self, round_idx: int, epoch: int, on_iteration=None, collect_features: bool = False) -> dict:
        rt = self.cfg.runtime
        control = self.wire.pack("control", "all", meta={"round": round_idx, "epoch": epoch,
                                                         "collect": collect_features})
        self.wire.audit.round = round_idx + 1
        self._call(self.server.begin_epoch.remote(control), "epoch start")
        nb, iterations = self.batches_per_client(), self.iterations_per_epoch()
        given = {i: self.wire.pack("given", f"client:{i}", i, {"x": x, "y": y}) for i, (x, y) in self._given.items()}
        self._given = {}  # for this epoch only
        self._gather({k: h.begin_epoch.remote(control, [given[i] for i in self.groups[k] if i in given])
                      for k, h in self._live().items()}, (round_idx, epoch, 0))
        n = len(self.sizes)
        noise, epoch_losses = epoch_noise(self.seed, round_idx, epoch), EpochLosses(n)
        for t in range(iterations):
            where = (round_idx, epoch, t)
            # the simulation's noise stream, whoever takes part: the same z for the same client
            z = {i: torch.randn(self.batch_size, self.z_dim, generator=noise) for i in range(n)
                 if t < nb[i] or self.equal_steps}
            ctl = self.wire.pack("control", "hosts", meta={"round": round_idx, "epoch": epoch, "t": t,
                                                           "collect": collect_features, "deadline_s": rt.deadline_s})
            refs = {}
            for k, h in self._live().items():
                msgs = [self.wire.pack("noise", f"client:{i}", i, {"z": z[i]}) for i in self.groups[k] if i in z]
                if msgs:
                    refs[k] = h.phase_a.remote(ctl, msgs)
            res_a = self._gather(refs, where)
            self._call(self.server.step.remote("D"), "the discriminator step")
            res_b = self._gather({k: self.hosts[k].phase_b.remote(ctl) for k in res_a if k not in self._failed}, where)
            self._call(self.server.step.remote("G"), "the generator step")
            losses = {}
            for k, msg in res_b.items():
                ld = res_a[k].meta["loss_d"]
                for i, lg in msg.meta["loss_g"].items():
                    losses[int(i)] = (ld[i], lg)
                for i in res_a[k].meta["skipped"]:
                    self._events["skipped_iterations"][str(i)] = self._events["skipped_iterations"].get(str(i), 0) + 1
            epoch_losses.add(losses)
            self._done[list(losses)] += 1
            if on_iteration is not None and losses:
                on_iteration(dict(sorted(losses.items())))
            for hook in self.after_iteration:
                hook(round_idx, epoch, t)
        return epoch_losses.means()

    # -- round end ---------------------------------------------------------------------------------
    def federate(self, strategy, sizes: np.ndarray, round_idx: int, seed: int, use_features: bool) -> Aggregation:
        """Round end on the server actor (the strategy there is built from the same config), then
        failed hosts restarted or dropped, and every actor's state collected for the checkpoint."""
        where = (round_idx, -1, -1)
        if self.cfg.federation.secure_aggregation:
            m = self._secure_round_end(round_idx, seed, use_features)
        else:
            self._gather({k: h.push_weights.remote() for k, h in self._live().items()}, where)
            m = self._call(self.server.federate.remote(self._round_end_control(round_idx, seed, use_features)),
                           "aggregation")
            self._gather({k: h.pull_weights.remote() for k, h in self._live().items()}, where)
        agg = Aggregation(np.asarray(m.meta["groups"]), np.asarray(m.meta["cluster_weights"]),
                          np.asarray(m.meta["global_weights"]), m.meta["info"])
        for k in sorted(self._failed):
            self._recover(k)
        self._last_state = self._collect_state()
        self.model.load_state_dict(self._last_state["model"])
        return agg

    def _round_end_control(self, round_idx: int, seed: int, use_features: bool) -> Message:
        """The clients of the live hosts that trained this round."""
        clients = sorted(i for k in self._live() for i in self.groups[k] if self._done[i] > 0)
        return self.wire.pack("control", "server", meta={"round": round_idx, "seed": seed, "clients": clients,
                                                         "use_features": use_features})

    def _secure_round_end(self, round_idx: int, seed: int, use_features: bool) -> Message:
        """Secure aggregation (federation/secagg.py): the server's plan, then each step's answers
        from the hosts relayed by the server (signed keys, sealed shares, the signed survivor list);
        masked words and unmasking answers go from the hosts straight to the server; the opened
        averages back. A host that fails on the way drops its clients from the steps after it."""
        where = (round_idx, -1, -1)

        def ask(call, *args) -> list[Message]:
            answers = self._gather({k: getattr(h, call).remote(*args) for k, h in self._live().items()}, where)
            return [m for msgs in answers.values() for m in msgs or []]

        for k, h in self._live().items():  # the roster: identities enrolled by the driver, not the server
            if any(i not in self._roster for i in self.groups[k]):
                self._roster.update(self._call(h.enroll.remote(), "enrollment"))
        plan = self._call(self.server.plan_secure.remote(self._round_end_control(round_idx, seed, use_features)),
                          "aggregation")
        keys = self._call(self.server.relay_keys.remote(ask("advertise_keys", plan, dict(self._roster))),
                          "aggregation")
        inbox = self._call(self.server.relay_shares.remote(ask("share_keys", keys)), "aggregation")
        for hook in self.before_masking:  # tests: a host that dies between the shares and its sums
            hook(round_idx)
        self._gather({k: h.push_masked.remote(inbox) for k, h in self._live().items()}, where)
        survivors = self._call(self.server.delivered.remote(), "aggregation")
        signatures = self._call(self.server.relay_signatures.remote(ask("sign_survivors", survivors)), "aggregation")
        if signatures:  # none when too few signed: no honest client unmasks, every sum stays closed
            self._gather({k: h.unmask.remote(signatures) for k, h in self._live().items()}, where)
        m = self._call(self.server.finish_secure.remote(), "aggregation")
        self._gather({k: h.pull_opened.remote() for k, h in self._live().items()}, where)
        return m

    def exchange(self, net: str, perm: list[int], *, optimiser_state: bool = True) -> None:
        raise HuscfError(f"the ray engine does not move a client's {net} to another client (method "
                         f"{self.cfg.method!r}): use runtime.engine=simulation")

    def _recover(self, k: int) -> None:
        for i in self.groups[k]:  # a restarted host makes new identities: enrolled again
            self._roster.pop(i, None)
        if self.cfg.runtime.on_failure == "drop":
            self.hosts.pop(k)
            self.dropped.update(self.groups[k])
            return
        self.hosts[k] = self._start_host(k)
        self._call(self.hosts[k].set_state.remote(self._client_messages(self._last_state, self.groups[k])),
                   "restart")

    def round_events(self) -> dict:
        """Failures and skipped iterations of the round for the metrics row (then reset); and the
        audit lines of the round appended to ``audit.jsonl``."""
        ev = self._events
        ev["iterations_per_client"] = self._done.tolist()
        if self.dropped:
            ev["dropped_clients"] = sorted(self.dropped)
        self._write_audit()
        self._events = self._no_events()
        return ev

    def _write_audit(self) -> None:
        rows = self.wire.audit.drain()
        rows += self._call(self.server.drain_audit.remote(), "audit")
        for h in self.hosts.values():
            rows += self._call(h.drain_audit.remote(), "audit")
        with self.audit_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- state -------------------------------------------------------------------------------------
    def _collect_state(self) -> dict:
        """The run's state in the simulation engine's format (checkpoints are interchangeable)."""
        model, client_opts = {}, [None] * len(self.sizes)
        for h in self.hosts.values():
            for m in self._call(h.get_state.remote(), "state collection"):
                tensors, opts = unpack_state(m.tensors(), m.meta)
                model.update(tensors)
                client_opts[m.client] = opts
        for i, opts in enumerate(client_opts):  # a dropped client keeps its last state
            if opts is None:
                client_opts[i] = self._last_state["client_opts"][i]
                prefix = f"clients.{i}."
                model.update({k: v for k, v in self._last_state["model"].items() if k.startswith(prefix)})
        m = self._call(self.server.get_state.remote(), "state collection")
        server_model, server_opts = unpack_state(m.tensors(), m.meta)
        model.update(server_model)
        return {"model": model, "client_opts": client_opts, "server_opts": server_opts}

    def _client_messages(self, state: dict, clients: list[int]) -> list[Message]:
        out = []
        for i in clients:
            prefix = f"clients.{i}."
            tensors = {k: v for k, v in state["model"].items() if k.startswith(prefix)}
            tensors, meta = pack_state(tensors, state["client_opts"][i])
            out.append(self.wire.pack("state", f"client:{i}", i, tensors, meta))
        return out

    def state_dict(self) -> dict:
        return self._last_state

    def load_state_dict(self, state: dict) -> None:
        for k, h in self.hosts.items():
            self._call(h.set_state.remote(self._client_messages(state, self.groups[k])), "resume")
        tensors, meta = pack_state(server_state(state["model"]), state["server_opts"])
        self._call(self.server.set_state.remote(self.wire.pack("state", "server", None, tensors, meta)), "resume")
        self._last_state = self._collect_state()
        self.model.load_state_dict(self._last_state["model"])

    def close(self) -> None:
        """End this run's actors (on a joined or shared Ray they would otherwise live on with the
        driver, computing nothing), then shut down a Ray this driver started."""
        if self.ray.is_initialized():
            for actor in [*self.hosts.values(), self.server]:
                with contextlib.suppress(Exception):  # already dead
                    self.ray.kill(actor)
        disconnect(self.ray, self._owns_ray)

