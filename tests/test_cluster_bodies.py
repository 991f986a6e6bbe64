"""A server body per cluster (federation/bodies.py): the same split == unsplit and seam properties
as the shared body, slots that follow clusters, one cluster == the shared body, checkpoints."""

import random

import numpy as np
import pytest
import torch

from huscf.config import build_config
from huscf.errors import HuscfError
from huscf.federation.bodies import apply_per_cluster, assign_slots
from huscf.federation.strategies import Aggregation
from huscf.models import build_architecture
from huscf.split.plan import all_cuts
from huscf.split.seam import SeamRecorder
from huscf.split.segments import SplitGAN
from huscf.trainer import Trainer


def _split(n=5, slots=3, seed=0):
    torch.manual_seed(seed)
    arch = build_architecture("cgan28", width=0.25)
    g, d = arch.generator(), arch.discriminator()
    cuts = random.Random(1).sample(all_cuts(g.num_middle, d.num_middle), n)
    split = SplitGAN(g, d, cuts, cluster_bodies=slots)
    with torch.no_grad():  # every body different from the reference networks
        for body in split.cluster_bodies:
            for p in body.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return arch, g, d, split


def test_split_equals_unsplit_through_each_clients_cluster_body():
    arch, g, d, split = _split()
    split.body_of.copy_(torch.tensor([0, 1, 2, 1, -1]))
    z, y = arch.generator_inputs(6, torch.Generator().manual_seed(2))
    for i in range(5):
        # the unsplit reference: the client's own blocks and its body's middle blocks in one net
        body = split.body(i)
        assert body is (split.server if i == 4 else split.cluster_bodies[[0, 1, 2, 1][i]])
        ref_g, ref_d = split.assemble(i, "G"), split.assemble(i, "D")
        split.zero_grad()
        fake = split.generate(i, z, y)
        out = split.discriminate(i, fake, y)
        torch.testing.assert_close(fake, ref_g(z, y))
        torch.testing.assert_close(out, ref_d(ref_g(z, y), y))
        out.square().sum().backward()
        ref_d(ref_g(z, y), y).square().sum().backward()
        for net, ref in (("G", ref_g), ("D", ref_d)):
            own = split.clients[i].nets[net]
            for b, ref_block in enumerate(ref.blocks):
                block = own[str(b)] if str(b) in own else body.nets[net][str(b)]
                for p, q in zip(block.parameters(), ref_block.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        # the gradient reached the client's body, and no other body
        others = [bd for bd in split.server_bodies() if bd is not body]
        assert all(p.grad is None or not p.grad.any() for bd in others for p in bd.parameters())


def test_the_seam_sees_the_same_crossings_with_cluster_bodies():
    arch, g, d, split = _split()
    shared = SplitGAN(g, d, split.cuts)
    z, y = arch.generator_inputs(3)
    seen = []
    for model in (shared, split):
        if model is split:
            split.body_of.copy_(torch.tensor([2, 0, 1, 0, 2]))
        model.seam.recorder = SeamRecorder()
        for i in range(5):
            model.discriminate(i, model.generate(i, z, y), y).sum().backward()
        seen.append(sorted((c.kind, c.direction, c.net, c.block, c.shape, c.client)
                           for c in model.seam.recorder.crossings))
    assert seen[0] == seen[1] and seen[0]


def test_slots_follow_clusters_and_bodies_average_what_members_used():
    assert assign_slots(np.full(4, -1), np.array([0, 0, 1, 1]), 3).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0],
                                                                                [0, 0, 2, 2], [2, 2, 0, 0],
                                                                                [1, 1, 2, 2], [2, 2, 1, 1])
    # the clusters swap labels: the slots stay with their members
    assert assign_slots(np.array([2, 2, 0, 0]), np.array([0, 0, 1, 1]), 3).tolist() == [2, 2, 0, 0]
    with pytest.raises(HuscfError, match="max_clusters"):
        assign_slots(np.full(3, -1), np.array([0, 1, 2]), 2)

    arch, g, d, split = _split(n=4, slots=2)
    before = {k: v.clone() for k, v in split.state_dict().items()}
    groups, cw, gw = np.array([0, 0, 1, 1]), np.array([0.3, 0.7, 0.5, 0.5]), np.array([0.1, 0.2, 0.3, 0.4])
    record = apply_per_cluster(split, Aggregation(groups, cw, gw, {"phase": "clustered"}), [0, 1, 2, 3])
    slot = split.body_of.tolist()
    assert slot[0] == slot[1] != slot[2] == slot[3] and set(record["new_slots"].values()) == {-1}
    for net in ("G", "D"):
        for key in split.server.nets[net]:
            def used(i, name, net=net, key=key):
                where = f"clients.{i}.nets" if split.clients[i].holds(net, int(key)) else "server.nets"
                return before[f"{where}.{net}.{key}.{name}"]
            for name, v in split.cluster_bodies[slot[0]].nets[net][key].state_dict().items():
                if v.is_floating_point():
                    torch.testing.assert_close(v, 0.3 * used(0, name) + 0.7 * used(1, name))
                    torch.testing.assert_close(split.server.nets[net][key].state_dict()[name],
                                               sum(gw[i] * used(i, name) for i in range(4)))


def _tiny(*extra):
    return build_config({}, ["data.clients_per_domain=2", "model.width=0.125", "train.local_epochs=1",
                             "train.batch_size=32", "train.max_iters_per_epoch=2", "output.samples_per_class=2",
                             "cuts.method=random", "federation.warmup_rounds=1", "output.samples_every=0",
                             "output.keep_full_checkpoints=1", *extra])


def test_one_cluster_per_cluster_body_trains_as_the_shared_body(tmp_path):
    runs = {}
    for body in ("shared", "per_cluster"):
        t = Trainer.new(_tiny("train.rounds=2", "federation.clusters=1", f"federation.server_body={body}"),
                        tmp_path / body, quiet=True)
        t.fit()
        runs[body] = t
    shared, per = runs["shared"].model, runs["per_cluster"].model
    assert per.body_of.tolist() == [per.body_of[0].item()] * 4 and per.body_of[0] >= 0
    z, y = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    for i in range(4):  # every client computes the same functions (its body is the one slot)
        for net in ("G", "D"):
            a, b = shared.assemble(i, net).state_dict(), per.assemble(i, net).state_dict()
            for k in a:
                torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-6, msg=f"{i} {net} {k}")
        torch.testing.assert_close(shared.generate(i, z, y), per.generate(i, z, y), rtol=0, atol=1e-5)
    # the slot took the shared body's Adam state, so the next round steps the same way
    for net in ("G", "D"):
        opt_s, opt_p = runs["shared"].engine.server_opts[net], runs["per_cluster"].engine.server_opts[net]
        slot = per.cluster_bodies[per.body_of[0].item()]
        for p_s, p_p in zip(shared.server.nets[net].parameters(), slot.nets[net].parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_s.state[p_s][key], opt_p.state[p_p][key], rtol=0, atol=1e-6)


def test_cluster_bodies_are_checkpointed_and_resumed(tmp_path):
    full = Trainer.new(_tiny("train.rounds=3", "federation.server_body=per_cluster"), tmp_path / "full", quiet=True)
    full.fit()
    part = Trainer.new(_tiny("train.rounds=2", "federation.server_body=per_cluster"), tmp_path / "part", quiet=True)
    part.fit()
    state = part.run.load_model_state(2)
    assert "body_of" in state and any(k.startswith("cluster_bodies.") for k in state)
    resumed = Trainer.resume(tmp_path / "part", ["train.rounds=3"], quiet=True)
    assert resumed.model.body_of.tolist() == state["body_of"].tolist()
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_per_cluster_bodies_refuse_what_they_do_not_support_in_one_line(tmp_path):
    for extra, why in ((["method=fedgan"], "split method"),
                       (["federation.secure_aggregation=true"], "secure aggregation"),
                       (["compute.clients=batched"], "loop engine")):
        with pytest.raises(HuscfError, match=why):
            Trainer.new(_tiny("train.rounds=1", "federation.server_body=per_cluster", *extra), tmp_path / "x",
                        quiet=True)
