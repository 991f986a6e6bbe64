"""A round end changes the values of the clients' weights and optimiser states, never how they are
stored. A parameter that comes back in another memory format, dtype or device, or that stops being
the tensor the optimiser steps (or the view of its weight bank that the batched engine runs), makes
every later iteration slower or silently wrong (issue 19). Checked for every method's round end on
the per-client loop and the batched engine, and for the checkpoint writer's threads."""

import threading

import pytest
import torch

from huscf.config import build_config
from huscf.methods import method_names
from huscf.rundir.files import RunDir
from huscf.trainer import Trainer

TINY = [
    "output.keep_full_checkpoints=1", "output.samples_every=0",
    "data.clients_per_domain=2", "model.width=0.125", "train.rounds=3", "train.local_epochs=1",
    "train.batch_size=32", "train.max_iters_per_epoch=2", "federation.warmup_rounds=1", "cuts.method=random",
]
ENGINES = {"loop": ["compute.clients=loop"], "batched": ["compute.clients=batched"]}


def _layout(t: torch.Tensor) -> tuple:
    return (t.dtype, t.device, tuple(t.shape), t.stride(), t.untyped_storage().data_ptr(), t.storage_offset())


def _structure(trainer: Trainer) -> dict:
    """Where every client and server parameter and every optimiser state tensor lives."""
    eng, model = trainer.engine, trainer.model
    out = {}
    for i, client in enumerate(model.clients):
        for net, module in client.nets.items():
            for name, p in module.named_parameters():
                out[("param", i, net, name)] = _layout(p) + (id(p),)
    for k, body in enumerate(model.server_bodies()):  # the shared body, then any per-cluster ones
        for net, module in body.nets.items():
            for name, p in module.named_parameters():
                out[("server", k, net, name)] = _layout(p) + (id(p),)
    opts = [((i, net), o) for i, slots in enumerate(eng.client_opts) for net, o in slots.items()]
    opts += [(("server", net), o) for net, o in eng.server_opts.items()]
    for where, opt in opts:
        for j, state in opt.state_dict().get("state", {}).items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[("opt", *where, j, key)] = _layout(value)
    return out


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("method", method_names())
def test_a_round_end_keeps_every_tensor_where_it_was(tmp_path, method, engine):
    trainer = Trainer.new(build_config({}, TINY + ENGINES[engine] + [f"method={method}"]), tmp_path / "run",
                          quiet=True)
    federate, seen = trainer.engine.federate, []

    def checked(*args, **kwargs):
        before = _structure(trainer)
        agg = federate(*args, **kwargs)
        after = _structure(trainer)
        changed = [k for k in before if after.get(k) != before[k]]
        assert not changed, f"round end moved: {changed[:5]}"
        # new tensors only where a cluster body is used for the first time: its Adam states
        added = set(after) - set(before)
        assert not added or agg.info.get("bodies", {}).get("new_slots"), sorted(added)[:5]
        assert all(k[:2] == ("opt", "server") for k in added), sorted(added)[:5]
        seen.append(len(before))
        return agg

    trainer.engine.federate = checked
    trainer.fit()
    assert len(seen) == 3 and seen[0] > 0  # a warm-up and two clustered round ends were checked
    # the optimiser states existed (an iteration ran before the first round end)
    assert any(k[0] == "opt" for k in _structure(trainer))


def test_the_checkpoint_writer_runs_one_torch_thread_and_leaves_training_its_own(tmp_path):
    """A second thread that runs parallel ops gets its own OpenMP team, which slowed every
    iteration after the first slimmed checkpoint by 1.6-1.8x on 2 cores (issue 19)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))  # put back below: a parallel test worker runs one thread
    try:
        main_threads = torch.get_num_threads()
        run = RunDir(tmp_path / "run")
        run.create()
        state = {"round": 1, "engine": {"model": {"w": torch.randn(300_000)}}}
        for r in (1, 2, 3):  # the third save slims round 1 (load, dedupe, save) on the writer thread
            run.save_checkpoint(r, state, keep_full=2)
        run.flush()
        assert torch.load(run.checkpoints / "round_0001.pt", weights_only=False)["slim"]
        seen = run._writer.submit(lambda: (threading.current_thread().name, torch.get_num_threads())).result()
        assert seen[0].startswith("huscf-checkpoint") and seen[1] == 1
        assert torch.get_num_threads() == main_threads
    finally:
        torch.set_num_threads(before)
