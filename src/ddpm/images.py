"""Images for people: sample grids (PNG) and uint8 arrays, from [-1, 1] tensors.

The grid and the PNG are torchvision's ``make_grid`` and ``save_image`` written out (the same pixels: tests/test_sample.py
compares them): importing torchvision costs a command 2.7 s of start-up (its models and ops), more than the rest of
sampling a grid of digits.
"""

from __future__ import annotations

from typing import IO

import numpy as np
import torch
import torch.nn.functional as F


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> [0, 255] NHWC uint8, the usual layout of image arrays."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def class_rows(num_images: int, num_classes: int | None) -> int:
    """Images per grid row: a row per class for conditional samples, a square grid otherwise."""
    return -(-num_images // num_classes) if num_classes else max(1, round(num_images**0.5))


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """torchvision.utils.make_grid: (B, C, H, W) in [0, 1] -> one (3, rows, cols) image, ``nrow`` images per row, each
    framed by ``padding`` pixels of ``pad_value`` (grey images as RGB; a single image unframed, as torchvision does)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:  # one image is its own grid, unframed
        return images[0].clone()
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = -(-count // columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, cell_h * rows + padding, cell_w * columns + padding), pad_value)
    for k in range(count):
        y, x = divmod(k, columns)
        grid[:, y * cell_h + padding:y * cell_h + padding + height, x * cell_w + padding:x * cell_w + padding + width] = images[k]
    return grid


def save_png(grid: torch.Tensor, file: str | IO[bytes]) -> None:
    """torchvision.utils.save_image of a (3, H, W) grid in [0, 1]: rounded to 8 bits, written as PNG."""
    from PIL import Image

    array = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(array).save(file, format="png")


def to_grid(images: torch.Tensor, nrow: int, min_size: int = 32) -> torch.Tensor:
    """A [0, 1] image grid; images smaller than ``min_size`` are enlarged with nearest-neighbour so the
    8x8 digits stay sharp and legible."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    factor = max(1, -(-min_size // images.shape[-1]))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
