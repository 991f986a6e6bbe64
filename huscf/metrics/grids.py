"""Sample grids as PNG: one row per class, images in [-1, 1] mapped to 0..255; their fixed inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from huscf.metrics.classifiers import _write_atomic


def class_grid_inputs(num_classes: int, per_class: int, z_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed ``(z, y)`` for a grid with one row per class (the same noise every round, seeded)."""
    y = torch.arange(num_classes).repeat_interleave(per_class)
    z = torch.randn(len(y), z_dim, generator=torch.Generator().manual_seed(seed))
    return z, y


def image_grid(images: torch.Tensor, rows: int, pad: int = 2) -> np.ndarray:
    """(rows*cols, C, H, W) in [-1, 1] -> uint8 (H', W') or (H', W', 3) grid, row-major."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    grid = np.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255 if c == 1 else 0, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = arr[k]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    """Write a grid PNG atomically (temp file + rename), upscaled ``scale`` times for viewing."""
    img = Image.fromarray(image_grid(images, rows))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    _write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
