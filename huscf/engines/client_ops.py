"""Layers run for many clients at once, each client with its own weights: the batched engine's
alternatives to ``torch.func.vmap`` for the two layer kinds where vmap's rule can be slow.

Every function takes activations stacked by client, ``x`` of shape (clients, B, C, H, W), and
returns the same layout. All of them compute exactly what the layer computes for each client on
its own (per-client statistics, per-client weights), up to floating-point summation order.

* ``folded_batch_norm`` - BatchNorm2d with batch statistics as one ``batch_norm`` over the clients
  folded into the channels (B, clients x C, H, W);
* ``client_conv`` - a Conv2d / ConvTranspose2d with one weight per client, as ``vmap`` (grouped
  convolutions), ``loop`` (one ordinary convolution per client) or ``bmm`` (unfold + batched
  matmul for a convolution, batched matmul + fold for a transposed one).

``benchmarks/bench_blocks.py`` times these against vmap on the hardware at hand.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

CONV_WAYS = ("vmap", "loop", "bmm")


def folded_batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """``bn`` with batch statistics for every client of ``x``, one call. ``weights``: the clients'
    stacked affine parameters ({"weight", "bias"}, each (clients, C)), or None for ``bn``'s own,
    shared by all clients (the server's copy)."""
    rows, batch, c = x.shape[:3]
    folded = x.transpose(0, 1).reshape(batch, rows * c, *x.shape[3:])
    if weights is not None:
        w, b = (None if weights.get(k) is None else weights[k].reshape(-1) for k in ("weight", "bias"))
    else:
        w, b = (None, None) if not bn.affine else (bn.weight.repeat(rows), bn.bias.repeat(rows))
    out = F.batch_norm(folded, None, None, w, b, training=True, eps=bn.eps)
    return out.view(batch, rows, *x.shape[2:]).transpose(0, 1)


def batch_norm_foldable(bn: nn.Module) -> bool:
    """A BatchNorm2d that normalises with batch statistics and keeps no running ones."""
    return isinstance(bn, nn.BatchNorm2d) and bn.training and not bn.track_running_stats


def conv_supported(conv: nn.Module) -> bool:
    """A convolution ``client_conv`` can run other than through vmap (plain zero padding, no
    dilation, no groups)."""
    return (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def client_conv(conv: nn.Conv2d | nn.ConvTranspose2d, weight: torch.Tensor, bias: torch.Tensor | None,
                x: torch.Tensor, how: str) -> torch.Tensor:
    """``conv``'s operation for every client of ``x`` with that client's ``weight[k]`` and
    ``bias[k]`` (stacked by client), run the way ``how`` names (see the module docstring)."""
    transposed = isinstance(conv, nn.ConvTranspose2d)
    extra = {"output_padding": conv.output_padding} if transposed else {}
    one = partial(F.conv_transpose2d if transposed else F.conv2d, stride=conv.stride, padding=conv.padding, **extra)
    if how == "vmap":
        return vmap(one, in_dims=(0, 0, None if bias is None else 0))(x, weight, bias)
    if how == "loop":
        return torch.stack([one(x[k], weight[k], None if bias is None else bias[k]) for k in range(len(x))])
    if how != "bmm":
        raise ValueError(f"unknown way to run a client convolution: {how!r} (one of {CONV_WAYS})")
    return _bmm_conv_transpose(conv, weight, bias, x) if transposed else _bmm_conv(conv, weight, bias, x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """unfold and fold are not autocast ops: cast to what autocast gives a matmul first."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _bmm_conv(conv: nn.Conv2d, weight, bias, x):
    n, batch, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    dt = _compute_dtype(x)
    # im2col, then (clients, Cout, C kh kw) @ (clients, C kh kw, B Ho Wo)
    cols = F.unfold(x.to(dt).reshape(n * batch, c, h, w), (kh, kw), padding=(ph, pw), stride=(sh, sw))
    cols = cols.view(n, batch, c * kh * kw, ho * wo).transpose(1, 2).reshape(n, c * kh * kw, batch * ho * wo)
    wmat = weight.to(dt).reshape(n, -1, c * kh * kw)
    out = torch.bmm(wmat, cols) if bias is None else torch.baddbmm(bias.to(dt).unsqueeze(-1), wmat, cols)
    return out.view(n, -1, batch, ho, wo).transpose(1, 2)


def _bmm_conv_transpose(conv: nn.ConvTranspose2d, weight, bias, x):
    n, batch, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = conv.kernel_size, conv.stride, conv.padding, conv.output_padding
    ho, wo = (h - 1) * sh - 2 * ph + kh + oh, (w - 1) * sw - 2 * pw + kw + ow
    cout = weight.shape[2]
    dt = _compute_dtype(x)
    # (clients, Cout kh kw, Cin) @ (clients, Cin, B H W), then col2im sums the overlapping windows
    xc = x.to(dt).transpose(1, 2).reshape(n, c, batch * h * w)
    cols = torch.bmm(weight.to(dt).reshape(n, c, cout * kh * kw).transpose(1, 2), xc)
    cols = cols.view(n, cout * kh * kw, batch, h * w).transpose(1, 2).reshape(n * batch, cout * kh * kw, h * w)
    out = F.fold(cols, (ho, wo), (kh, kw), padding=(ph, pw), stride=(sh, sw)).view(n, batch, cout, ho, wo)
    return out if bias is None else out + bias.to(dt).view(n, 1, cout, 1, 1)
