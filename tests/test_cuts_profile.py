"""Profiling: measured FLOPs against an analytic count of conv/linear layers, and cut bytes."""

import pytest
import torch
from torch import nn

from huscf.cuts.profile import profile_architecture, profile_blocks
from huscf.models import build_architecture

B = 8


def analytic_flops(block: nn.Module, inputs: tuple) -> int:
    """2 * multiply-adds of every Conv2d / ConvTranspose2d / Linear, from the shapes a forward sees."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        x = args[0]
        if isinstance(m, nn.Linear):
            total += 2 * x.shape[0] * m.in_features * m.out_features
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            per_position = 2 * x.shape[0] * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            # a transposed conv applies its kernel once per *input* position, a conv per *output* one
            positions = x.shape[2:] if isinstance(m, nn.ConvTranspose2d) else out.shape[2:]
            total += per_position * positions[0] * positions[1]

    handles = [m.register_forward_hook(hook) for m in block.modules()]
    with torch.no_grad():
        block(*inputs)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["cgan28", "dcgan32"])
def test_flops_match_analytic_count(name):
    arch = build_architecture(name)
    prof = profile_architecture(arch, B)
    for net, inputs, p in ((arch.generator(), arch.generator_inputs(B), prof.g),
                           (arch.discriminator(), arch.discriminator_inputs(B), prof.d)):
        h = inputs
        for b, block in enumerate(net.blocks):
            expected = analytic_flops(block, h)
            assert p.fwd_flops[b] == pytest.approx(expected, rel=0.05), (name, b)
            # backward = weight gradient + input gradient, each as costly as the forward
            assert p.bwd_flops[b] == pytest.approx(2 * expected, rel=0.05), (name, b)
            with torch.no_grad():
                h = (block(*h),)


def test_stride2_transposed_conv_not_overcounted():
    prof = profile_architecture(build_architecture("cgan28"), B)
    # g_1: ConvTranspose2d(256, 128, 4, stride 2) on 7x7: per input position, not per 14x14 output
    assert prof.g.fwd_flops[1] == 2 * B * 7 * 7 * 256 * 128 * 16


def test_bytes_at_every_cut():
    prof = profile_architecture(build_architecture("cgan28"), B)
    g_sizes = (256 * 7 * 7, 128 * 14 * 14, 128 * 14 * 14, 64 * 28 * 28, 28 * 28)
    assert prof.g.out_bytes == tuple(4 * B * n for n in g_sizes)
    assert prof.d.out_bytes == tuple(4 * B * n for n in (64 * 14 * 14, 128 * 7 * 7, 128 * 7 * 7, 256 * 4 * 4, 1))
    half = profile_architecture(build_architecture("cgan28"), B, torch.float16)
    assert half.g.out_bytes == tuple(b // 2 for b in prof.g.out_bytes)


def test_any_block_list_and_cache():
    blocks = [nn.Linear(3, 5), nn.Sequential(nn.Linear(5, 7), nn.ReLU()), nn.Linear(7, 2)]
    p = profile_blocks(blocks, (torch.randn(4, 3),))
    assert p.fwd_flops == (2 * 4 * 3 * 5, 2 * 4 * 5 * 7, 2 * 4 * 7 * 2)
    assert p.bwd_flops == (2 * 4 * 3 * 5, 4 * 4 * 5 * 7, 4 * 4 * 7 * 2)  # no input gradient for block 0
    assert p.out_bytes == (4 * 4 * 5, 4 * 4 * 7, 4 * 4 * 2)
    arch = build_architecture("dcgan32")
    assert profile_architecture(arch, B) is profile_architecture(build_architecture("dcgan32"), B)
    assert profile_architecture(arch, B).g.num_middle == 4
