"""Split == unsplit: outputs and gradients for random valid cuts, on two architectures."""

import random

import pytest
import torch

from huscf.errors import HuscfError
from huscf.models import build_architecture
from huscf.split.plan import Cuts, all_cuts, validate_cuts
from huscf.split.seam import SeamRecorder
from huscf.split.segments import SplitGAN
from numerics import assert_close64


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("arch_name", ["cgan28", "dcgan32"])
def test_split_equals_unsplit_forward_and_backward(arch_name):
    torch.manual_seed(0)
    arch = build_architecture(arch_name, width=0.25)
    g, d = arch.generator().double(), arch.discriminator().double()  # float64: tests/numerics.py rule 1
    configs = random.Random(1).sample(all_cuts(g.num_middle, d.num_middle), 5)
    split = SplitGAN(g, d, configs)
    z, y = arch.generator_inputs(6, torch.Generator().manual_seed(2))
    z = z.double()
    for i, cuts in enumerate(configs):
        split.zero_grad()
        g.zero_grad()
        d.zero_grad()
        fake_split = split.generate(i, z, y)
        out_split = split.discriminate(i, fake_split, y)
        fake_ref = g(z, y)
        out_ref = d(fake_ref, y)
        assert_close64(fake_split, fake_ref, msg=f"client {i} G")
        assert_close64(out_split, out_ref, msg=f"client {i} D")
        out_split.square().sum().backward()
        out_ref.square().sum().backward()
        # every block of the assembled client network has the reference gradient
        for net_name, ref in (("G", g), ("D", d)):
            own, body = split.clients[i].nets[net_name], split.server.nets[net_name]
            for b, ref_block in enumerate(ref.blocks):
                block = own[str(b)] if str(b) in own else body[str(b)]
                for p, q in zip(block.parameters(), ref_block.parameters()):
                    assert_close64(p.grad, q.grad, msg=f"client {i} {net_name} block {b} gradient")
        # the assembled standalone network is the same function
        assert_close64(split.assemble(i, "G")(z, y), fake_ref, msg=f"client {i} assembled G")


def test_server_gradient_is_sum_over_clients():
    torch.manual_seed(0)
    arch = build_architecture("cgan28", width=0.25)
    g, d = arch.generator(), arch.discriminator()
    split = SplitGAN(g, d, [Cuts(0, 0, 0, 0), Cuts(0, 0, 1, 0)])
    x, y = arch.discriminator_inputs(4)
    # block 1 of D runs on the server for client 0 only (client 1 holds its own copy)
    split.discriminate(0, x, y).sum().backward()
    g0 = split.server.nets["D"]["2"][0].weight.grad.clone()
    split.discriminate(1, x, y).sum().backward()
    g01 = split.server.nets["D"]["2"][0].weight.grad
    assert not torch.allclose(g0, g01)  # client 1's gradient was added to the same server block


def test_validate_cuts_rejects_cuts_that_leave_the_server_nothing():
    with pytest.raises(HuscfError, match="client 3: generator cuts head=2 \\+ tail=1 leave the server no block"):
        validate_cuts([2, 1, 0, 0], 3, 3, client=3)
    with pytest.raises(HuscfError, match="client 0: cut td=-1"):
        validate_cuts([0, 0, 0, -1], 3, 3, client=0)
    with pytest.raises(HuscfError, match="4 integers"):
        validate_cuts([0, 0, 0], 3, 3, client=0)
    assert len(all_cuts(3, 3)) == 36


def test_recorder_sees_only_cut_activations_and_their_gradients():
    torch.manual_seed(0)
    arch = build_architecture("cgan28", width=0.25)
    split = SplitGAN(arch.generator(), arch.discriminator(), [Cuts(1, 0, 0, 1)])
    split.seam.recorder = SeamRecorder()
    z, y = arch.generator_inputs(3)
    split.discriminate(0, split.generate(0, z, y), y).sum().backward()
    kinds = {(c.kind, c.direction, c.net, c.block, c.shape) for c in split.seam.recorder.crossings}
    w = lambda c: max(1, round(c * 0.25))  # noqa: E731
    assert kinds == {
        ("activation", "client->server", "G", 1, (3, w(128), 14, 14)),
        ("activation", "server->client", "G", 3, (3, w(64), 28, 28)),
        ("activation", "client->server", "D", 0, (3, w(64), 14, 14)),
        ("activation", "server->client", "D", 2, (3, w(128), 7, 7)),
        ("gradient", "server->client", "G", 1, (3, w(128), 14, 14)),
        ("gradient", "client->server", "G", 3, (3, w(64), 28, 28)),
        ("gradient", "server->client", "D", 0, (3, w(64), 14, 14)),
        ("gradient", "client->server", "D", 2, (3, w(128), 7, 7)),
    }
