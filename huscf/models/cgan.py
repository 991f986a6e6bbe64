"""Conditional DCGAN-style generators and discriminators, built as block lists.

Read top to bottom: one spec (``Architecture``) describes a conditional G/D pair; ``generator()``
and ``discriminator()`` turn it into ``BlockNet``s whose block 0 embeds the label and whose
last block emits the image (G) or one logit per sample (D). ``ARCHITECTURES`` holds the shipped
specs:

* ``cgan28`` - the paper's 28x28 grey cGAN (3 middle blocks in G and in D). ``width`` scales
  every channel count (1.0 = the paper: G 256-128-128-64, D 64-128-128-256).
* ``cgan28_rgb`` - ``cgan28`` for 28x28 colour images (BloodMNIST, DermaMNIST).
* ``dcgan32`` - a 32x32 RGB conditional DCGAN with 4 middle blocks in G and in D.

Where the label enters (``label_at``): ``"head"`` (the paper's, the default) embeds it in block
0 of G and of D, which the server receives the output of. ``"tail"`` keeps it out of everything
that crosses the seam: block 0 ignores it, the generator's tail block modulates its input per
class (``LabelledGeneratorTail``: one scale and shift per channel and class, FiLM) and the
discriminator's tail is a projection discriminator (``ProjectionTail``, Miyato and Koyama 2018).
What that hides and what it costs is measured in ``docs/security.md``.

The discriminator returns logits; training applies ``BCEWithLogits``, which equals the paper's
sigmoid + BCE but is numerically safer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from huscf.models.blocks import BlockNet

# (out_channels, kernel, stride, padding, output_padding) for transposed convolutions,
# (out_channels, kernel, stride, padding) for convolutions.
ConvT = tuple[int, int, int, int, int]
Conv = tuple[int, int, int, int]


class GeneratorHead(nn.Module):
    """Block g_0: label embedding + noise -> Linear -> BN -> ReLU -> (C, S, S). Without
    ``labelled`` (``label_at="tail"``) it takes the label and ignores it: noise only."""

    def __init__(self, z_dim: int, num_classes: int, channels: int, size: int, labelled: bool = True):
        super().__init__()
        self.channels, self.size = channels, size
        self.z_dim, self.num_classes = z_dim, num_classes  # the generator's input (``SplitGAN.latent``)
        self.embed = nn.Embedding(num_classes, num_classes) if labelled else None
        self.fc = nn.Linear(z_dim + (num_classes if labelled else 0), channels * size * size)
        self.bn = nn.BatchNorm1d(channels * size * size, track_running_stats=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(z if self.embed is None else torch.cat([z, self.embed(y)], dim=1))
        return torch.relu(self.bn(h)).view(-1, self.channels, self.size, self.size)


class DiscriminatorHead(nn.Module):
    """Block d_0: the label embedded as one extra image channel, concatenated, then a conv layer.
    Without ``labelled`` (``label_at="tail"``) it takes the label and ignores it: the image only."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, conv: Conv, labelled: bool = True):
        super().__init__()
        c, h, w = image_shape
        self.hw = (h, w)
        self.embed = nn.Embedding(num_classes, h * w) if labelled else None
        self.conv = conv_block(c + (1 if labelled else 0), conv)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return self.conv(x)
        label_plane = self.embed(y).view(-1, 1, *self.hw)
        return self.conv(torch.cat([x, label_plane], dim=1))


class LabelledGeneratorTail(nn.Module):
    """Block g_{M+1} with ``label_at="tail"``: the input's channels scaled and shifted per class
    (h * (1 + gamma_y) + beta_y, both starting at 0), then the image layer (transposed conv, tanh)."""

    takes_label = True

    def __init__(self, channels: int, num_classes: int, image_channels: int, kernel: int, padding: int):
        super().__init__()
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)
        self.out = nn.ConvTranspose2d(channels, image_channels, kernel, 1, padding)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale, shift = (1 + self.gamma(y))[:, :, None, None], self.beta(y)[:, :, None, None]
        return torch.tanh(self.out(h * scale + shift))


class ProjectionTail(nn.Module):
    """Block d_{M+1} with ``label_at="tail"``: a projection discriminator's output (Miyato and
    Koyama 2018), logit = w . f + e_y . f for the flattened features f and the label's embedding e_y."""

    takes_label = True

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)
        self.embed = nn.Embedding(num_classes, features)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = h.flatten(1)
        return self.linear(f) + (self.embed(y) * f).sum(1, keepdim=True)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm that always normalises with the batch's own statistics (no running averages).

    huscf never switches a GAN to eval-mode statistics (samples are drawn in train mode, as in
    training), so running averages would be state that nothing reads: dropping them keeps every
    execution path (per-client loop, batched clients, any device) holding the same state.
    """
    return nn.BatchNorm2d(channels, track_running_stats=False)


def conv_block(cin: int, spec: Conv) -> nn.Sequential:
    cout, k, s, p = spec
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), batch_norm(cout), nn.LeakyReLU(0.2))


def convt_block(cin: int, spec: ConvT) -> nn.Sequential:
    cout, k, s, p, op = spec
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, k, s, p, op), batch_norm(cout), nn.ReLU())


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN initialisation: conv weights N(0, 0.02), BN weights N(1, 0.02), BN bias 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class Architecture:
    """A conditional G/D pair. Channel counts are the width-1.0 values; ``width`` scales them."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    z_dim: int
    g_start: tuple[int, int]  # (channels, spatial size) produced by the generator head
    g_middle: tuple[ConvT, ...]
    g_out: tuple[int, int]  # (kernel, padding) of the final stride-1 transposed conv
    d_head: Conv
    d_middle: tuple[Conv, ...]
    width: float = 1.0
    label_at: str = "head"  # "head" (the paper's) or "tail" (module docstring)

    def _w(self, c: int) -> int:
        return max(1, int(round(c * self.width)))

    def generator(self) -> BlockNet:
        c0, s0 = self.g_start
        head = self.label_at == "head"
        blocks: list[nn.Module] = [GeneratorHead(self.z_dim, self.num_classes, self._w(c0), s0, labelled=head)]
        cin = self._w(c0)
        for cout, *rest in self.g_middle:
            blocks.append(convt_block(cin, (self._w(cout), *rest)))
            cin = self._w(cout)
        k, p = self.g_out
        blocks.append(nn.Sequential(nn.ConvTranspose2d(cin, self.image_shape[0], k, 1, p), nn.Tanh()) if head
                      else LabelledGeneratorTail(cin, self.num_classes, self.image_shape[0], k, p))
        return BlockNet(blocks).apply(dcgan_init)

    def discriminator(self) -> BlockNet:
        cout, *rest = self.d_head
        head = self.label_at == "head"
        blocks: list[nn.Module] = [DiscriminatorHead(self.image_shape, self.num_classes, (self._w(cout), *rest),
                                                     labelled=head)]
        size, cin = _conv_out(self.image_shape[1], *self.d_head[1:]), self._w(cout)
        for cout, k, s, p in self.d_middle:
            blocks.append(conv_block(cin, (self._w(cout), k, s, p)))
            size, cin = _conv_out(size, k, s, p), self._w(cout)
        blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(cin * size * size, 1)) if head
                      else ProjectionTail(cin * size * size, self.num_classes))
        return BlockNet(blocks).apply(dcgan_init)

    def generator_inputs(self, batch: int, generator: torch.Generator | None = None):
        """Example ``(z, y)`` for block g_0 (used by the cut profiler and the tests)."""
        z = torch.randn(batch, self.z_dim, generator=generator)
        y = torch.randint(0, self.num_classes, (batch,), generator=generator)
        return z, y

    def discriminator_inputs(self, batch: int, generator: torch.Generator | None = None):
        """Example ``(x, y)`` for block d_0."""
        x = torch.rand(batch, *self.image_shape, generator=generator) * 2 - 1
        y = torch.randint(0, self.num_classes, (batch,), generator=generator)
        return x, y


ARCHITECTURES: dict[str, Architecture] = {
    "cgan28": Architecture(
        "cgan28", image_shape=(1, 28, 28), num_classes=10, z_dim=100,
        g_start=(256, 7), g_middle=((128, 4, 2, 1, 0), (128, 3, 1, 1, 0), (64, 4, 2, 1, 0)), g_out=(3, 1),
        d_head=(64, 3, 2, 1), d_middle=((128, 3, 2, 1), (128, 3, 1, 1), (256, 3, 2, 1)),
    ),
    "dcgan32": Architecture(
        "dcgan32", image_shape=(3, 32, 32), num_classes=10, z_dim=100,
        g_start=(256, 4), g_middle=((192, 4, 2, 1, 0), (128, 3, 1, 1, 0), (96, 4, 2, 1, 0), (64, 4, 2, 1, 0)),
        g_out=(3, 1),
        d_head=(64, 3, 2, 1), d_middle=((128, 3, 2, 1), (128, 3, 1, 1), (192, 3, 2, 1), (256, 3, 1, 1)),
    ),
}
# cgan28 for colour 28x28 images (BloodMNIST, DermaMNIST): only the image's channels differ
ARCHITECTURES["cgan28_rgb"] = replace(ARCHITECTURES["cgan28"], name="cgan28_rgb", image_shape=(3, 28, 28))


LABEL_PLACES = ("head", "tail")  # ``Architecture.label_at``


def build_architecture(name: str, width: float = 1.0, num_classes: int | None = None,
                       image_shape: tuple[int, int, int] | None = None, label_at: str = "head") -> Architecture:
    """Look up a shipped architecture and apply the width multiplier / label count / label place."""
    base = ARCHITECTURES[name]  # a KeyError for an unknown name
    if label_at not in LABEL_PLACES:
        raise ValueError(f"label_at must be one of {LABEL_PLACES}, not {label_at!r}")
    arch = replace(base, width=width, num_classes=base.num_classes if num_classes is None else num_classes,
                   label_at=label_at)
    if image_shape is not None and tuple(image_shape) != arch.image_shape:
        raise ValueError(f"architecture {name} makes {arch.image_shape} images, the data has {tuple(image_shape)}")
    return arch
