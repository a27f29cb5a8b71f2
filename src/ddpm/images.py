"""Images for people: sample grids (PNG) and uint8 arrays, from [-1, 1] tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> [0, 255] NHWC uint8, the usual layout of image arrays."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def class_rows(num_images: int, num_classes: int | None) -> int:
    """Images per grid row: a row per class for conditional samples, a square grid otherwise."""
    return -(-num_images // num_classes) if num_classes else max(1, round(num_images**0.5))


def to_grid(images: torch.Tensor, nrow: int, min_size: int = 32) -> torch.Tensor:
    """A [0, 1] image grid; images smaller than ``min_size`` are enlarged with nearest-neighbour so the
    8x8 digits stay sharp and legible."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    factor = max(1, -(-min_size // images.shape[-1]))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
