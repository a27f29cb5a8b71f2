"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): patchify, a fixed 2-D
sin-cos position embedding, adaLN-Zero blocks conditioned on the noise input and the class, a zero-initialised final
layer, unpatchify.

The same backbone contract as the U-Net (``ddpm/core/backbone.py``): ``forward(x, c_noise, labels, c_noise_r=None)``
returns a tensor shaped like ``x`` (twice its channels with ``learn_sigma``, DiT's own output, for its parameter
count), and the network knows nothing about processes. The class embedding has ``num_classes + 1`` rows, the last
(``null_label``) the "no label" of classifier-free guidance, as DiT's LabelEmbedder. Every block's modulation and
the final layer start at zero, so the network's output is exactly zero before training (adaLN-Zero, sec. 3.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ddpm.core.settings import integer, number, require
from ddpm.core.unet import zero_init

FREQUENCY_DIM = 256  # the sinusoidal embedding of the noise input, before the MLP (DiT's TimestepEmbedder)


def noise_embedding(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t w_k), sin(t w_k)] with w_k = max_period^(-k / (dim/2 - 1)), k < dim/2: DiT's embedding (cos first) with
    the frequencies diffusers' DiTTransformer2DModel uses (``downscale_freq_shift=1``; DiT's own code divides by
    dim/2), so that a trained DiT exports to diffusers exactly (``ddpm/diffusers_export.py``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sincos_position_embedding(dim: int, grid: int) -> torch.Tensor:
    """(grid^2, dim) fixed 2-D sin-cos embedding (MAE's, as DiT uses): half the channels encode the row, half the
    column, each as sin and cos of the position at dim/4 frequencies 1 / 10000^(k / (dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for position in (cols.flatten(), rows.flatten()):  # DiT: the first half from the w coordinate
        angles = position[:, None] * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p p C): the tokens, row-major over the patch grid."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """The inverse of ``patchify``."""
    grid = math.isqrt(tokens.shape[1])
    return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, w=grid, p=patch_size, q=patch_size, c=channels)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's affine map of normalised tokens: x (1 + scale) + shift, per image."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over tokens: softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1), through
    ``F.scaled_dot_product_attention`` (``sdpa=True``), written out (``False``), or ``"auto"``: written out where
    autograd runs through it on a CPU, whose fused kernel's backward is the slower there (bf16 training 2.3x slower
    at dit_tiny, 1.14x at dit_s: ``benchmarks/throughput.py --ablate``), the fused kernel everywhere else."""

    def __init__(self, dim: int, num_heads: int, sdpa: bool | str = True):
        super().__init__()
        self.num_heads, self.sdpa = num_heads, sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        fused = self.sdpa if self.sdpa != "auto" else not (q.device.type == "cpu" and torch.is_grad_enabled())
        if fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """x + gate_1 attn(modulate(LN(x))) then x + gate_2 mlp(modulate(LN(x))); the six shifts, scales and gates from
    the conditioning c by a zero-initialised linear layer (adaLN-Zero), so the block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sdpa: bool | str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, sdpa)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) and a zero-initialised linear map from each token to its patch's pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = zero_init(nn.Linear(dim, patch_size * patch_size * out_channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 2 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def check_settings(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes,
                   learn_sigma, sdpa, second_time) -> None:
    """The DiT's settings (ConfigError naming the key): positive sizes, a patch that divides the image, heads that
    divide the width, and a width the 2-D position embedding can split in four. Validation builds the network on the
    meta device, so these are the only copy."""
    positive = lambda v: integer(v) and v > 0  # noqa: E731
    require(positive(image_size), "data.image_size", image_size, "an integer > 0")
    require(positive(in_channels), "data.channels", in_channels, "an integer > 0")
    for key, value in (("patch_size", patch_size), ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
        require(positive(value), f"model.{key}", value, "an integer > 0")
    require(number(mlp_ratio) and mlp_ratio > 0, "model.mlp_ratio", mlp_ratio, "a number > 0")
    require(num_classes is None or positive(num_classes), "model.num_classes", num_classes, "null or an integer > 0")
    for key, value in (("learn_sigma", learn_sigma), ("second_time", second_time)):
        require(isinstance(value, bool), f"model.{key}", value, "true or false")
    require(isinstance(sdpa, bool) or sdpa == "auto", "model.sdpa", sdpa, "true, false or auto")
    require(image_size % patch_size == 0, "model.patch_size", patch_size,
            f"a divisor of data.image_size={image_size} (the image is cut into whole patches)")
    require(hidden_size % num_heads == 0, "model.num_heads", num_heads,
            f"a divisor of model.hidden_size={hidden_size} (each head is hidden_size / num_heads wide)")
    require(hidden_size % 4 == 0, "model.hidden_size", hidden_size, "a multiple of 4 (the 2-D sin-cos position embedding)")


class DiT(nn.Module):
    """DiT: ``forward(x, c_noise, labels, c_noise_r=None)``. ``second_time``: it embeds a second time r too (the gap
    c_noise(t) - c_noise(r), through a zero-initialised MLP, as the U-Net does), for the objectives that ask for one."""

    speed_options = ("sdpa",)  # how it computes, not what: a resumed run may switch it

    def __init__(self, image_size: int, in_channels: int = 4, patch_size: int = 2, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int | None = 1000,
                 learn_sigma: bool = False, sdpa: bool | str = True, second_time: bool = False, out_channels: int | None = None):
        super().__init__()
        check_settings(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes,
                       learn_sigma, sdpa, second_time)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.patch_size, self.hidden_size, self.depth, self.num_heads = patch_size, hidden_size, depth, num_heads
        # DiT's learn_sigma doubles the output (its Table 1 counts); ddpm.builders sets out_channels for a learned variance
        self.out_channels = out_channels if out_channels is not None else (2 * in_channels if learn_sigma else in_channels)
        require(integer(self.out_channels) and self.out_channels > 0, "model.out_channels", self.out_channels, "an integer > 0")
        self.second_time = second_time
        self.patch_embed = self.make_patch_embed(in_channels, hidden_size, patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding(hidden_size, image_size // patch_size)[None],
                             persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.gap_embed = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(),
                                       zero_init(nn.Linear(hidden_size, hidden_size))) if second_time else None
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes is not None else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, sdpa) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def make_patch_embed(self, in_channels: int, hidden_size: int, patch_size: int) -> nn.Module:
        """Each p x p patch to a token by one linear map (a strided convolution), DiT's PatchEmbed."""
        return nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear layers and patch embedding, N(0, 0.02) for the class and time
        MLPs' first layers; the adaLN modulations and the final linear map stay at zero (adaLN-Zero)."""
        zeros = {id(p) for m in (*[b.adaLN_modulation for b in self.blocks], self.final) for p in m.parameters()}
        if self.gap_embed is not None:
            zeros |= {id(p) for p in self.gap_embed[2].parameters()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in zeros:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for conv in (m for m in self.patch_embed.modules() if isinstance(m, nn.Conv2d)):  # as a linear map (DiT)
            nn.init.xavier_uniform_(conv.weight.view(conv.out_channels, -1))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for mlp in (self.time_embed, *([self.gap_embed] if self.gap_embed is not None else [])):
            nn.init.normal_(mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)

    @property
    def null_label(self) -> int | None:
        """The class index meaning "unconditional" (Ho & Salimans 2022), or None for an unconditional net."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                c_noise_r: torch.Tensor | None = None) -> torch.Tensor:
        tokens = rearrange(self.patch_embed(x), "b d h w -> b (h w) d") + self.pos_embed.to(x.dtype)
        c = self.time_embed(noise_embedding(t).to(x.dtype))
        if self.gap_embed is not None:  # r = t (no second time given): a gap of zero
            gap = torch.zeros_like(t) if c_noise_r is None else t - c_noise_r
            c = c + self.gap_embed(noise_embedding(gap).to(x.dtype))
        elif c_noise_r is not None:
            raise ValueError("this DiT embeds no second time r: build it with second_time=True (objective=meanflow)")
        if self.class_embed is not None:
            if labels is None:
                raise ValueError("this DiT is class-conditional: pass labels (use null_label for unconditional)")
            c = c + self.class_embed(labels)
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final(tokens, c), self.patch_size, self.out_channels)
