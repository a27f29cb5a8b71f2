"""A plain ViT on large pixel patches, in the manner of JiT (Li & He 2025, "Back to Basics: Let Denoising Generative
Models Denoise"): the image cut into p x p pixel patches, each embedded by a linear map through a low-rank bottleneck
(p^2 C -> bottleneck -> width, no non-linearity between), DiT's adaLN-Zero blocks, a zero-initialised linear map back
to the patch's pixels. No U-Net skips, no latent space, no convolution beyond the patch cut.

JiT's question is what such a network should predict when a patch holds more values than a token is wide (p^2 C >
``hidden_size``): the clean image (x-prediction, on its low-dimensional manifold) or the noise or velocity (which fill
every dimension). ``model=vit_pixel_*`` sets such a patch; the prediction target is ``diffusion.prediction``, so the
question is one sweep. Everything but the patch embedding is the DiT's (``ddpm/core/dit.py``): the same backbone
contract, the same zero output before training, the same speed switch.
"""

from __future__ import annotations

from torch import nn

from ddpm.core.dit import DiT
from ddpm.core.settings import integer, require


class PixelViT(DiT):
    """DiT with JiT's bottleneck patch embedding; ``bottleneck``: the rank of the patch embedding (JiT: 128 at
    256x256 with 16- and 32-pixel patches)."""

    def __init__(self, image_size: int, in_channels: int = 3, patch_size: int = 16, hidden_size: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int | None = 1000,
                 bottleneck: int = 128, sdpa: bool | str = True, second_time: bool = False, out_channels: int | None = None):
        require(integer(bottleneck) and bottleneck > 0, "model.bottleneck", bottleneck, "an integer > 0 (JiT: 128)")
        self.bottleneck = bottleneck
        super().__init__(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes,
                         learn_sigma=False, sdpa=sdpa, second_time=second_time, out_channels=out_channels)

    def make_patch_embed(self, in_channels: int, hidden_size: int, patch_size: int) -> nn.Module:
        """p^2 C -> bottleneck -> width, both linear (JiT's bottleneck patch embedding)."""
        return nn.Sequential(nn.Conv2d(in_channels, self.bottleneck, patch_size, stride=patch_size, bias=False),
                             nn.Conv2d(self.bottleneck, hidden_size, 1))
