"""The DDPM U-Net (Ho et al. 2020, appendix B) with a class embedding for classifier-free guidance.

The network knows nothing about processes or prediction targets: it maps (x_t, the process's noise input c_noise(t),
class label) to one tensor shaped like the image, which ``ddpm/core/denoiser.py`` reads as the configured target. With ``num_classes`` set it embeds ``num_classes + 1`` labels; the
extra one (``null_label == num_classes``) stands for "no label" (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ddpm.core.errors import ConfigError
from ddpm.core.settings import integer, number, require


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5), as used by DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def zero_init(module: nn.Module) -> nn.Module:
    """Start a residual branch's last layer at zero, so every block begins as the identity (DDPM's init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as in Nichol & Dhariwal's improved-diffusion).

    Under bf16 autocast the statistics stay in float32, and on CPU it is also the fast path: PyTorch's
    channels-last bf16 GroupNorm kernels ran several times slower than float32 ones here (README, Performance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float() if x.dtype in (torch.bfloat16, torch.float16) else x)


class ResBlock(nn.Module):
    """Wide-ResNet block with GroupNorm, SiLU, dropout and an additive noise-level (+class) embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm32(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map: softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1).

    ``sdpa=True`` calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU); ``False``
    writes the product out, which was faster on CPU in bf16 at these sequence lengths (16-256 pixels)."""

    def __init__(self, ch: int, num_heads: int, groups: int, sdpa: bool = True):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide the channel count {ch}")
        self.num_heads, self.sdpa = num_heads, sdpa
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) x y -> three b h (x y) d", three=3, h=self.num_heads)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
        return x + self.proj(rearrange(out, "b h (x y) d -> b (h d) x y", x=height, y=width))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def check_settings(image_size, in_channels, base_channels, channel_mult, num_res_blocks, attention_resolutions, dropout,
                   num_heads, norm_groups, num_classes, channels_last, sdpa, second_time=False) -> None:
    """The U-Net's settings, one by one (ConfigError naming the key); then ``check_layout``, how they fit together.
    Validation builds the network on the meta device to check a config, so these are the only copy."""
    positive = lambda v: integer(v) and v > 0  # noqa: E731
    require(positive(image_size), "data.image_size", image_size, "an integer > 0")
    require(positive(in_channels), "data.channels", in_channels, "an integer > 0")
    for key, value in (("base_channels", base_channels), ("num_res_blocks", num_res_blocks), ("num_heads", num_heads),
                       ("norm_groups", norm_groups)):
        require(positive(value), f"model.{key}", value, "an integer > 0")
    require(isinstance(channel_mult, (list, tuple)) and len(channel_mult) > 0 and all(positive(m) for m in channel_mult),
            "model.channel_mult", channel_mult, "a non-empty list of integers > 0")
    require(isinstance(attention_resolutions, (list, tuple)) and all(positive(r) for r in attention_resolutions),
            "model.attention_resolutions", attention_resolutions, "a list of feature-map sizes (integers > 0)")
    require(number(dropout) and 0 <= dropout < 1, "model.dropout", dropout, "a probability in [0, 1)")
    require(num_classes is None or positive(num_classes), "model.num_classes", num_classes, "null or an integer > 0")
    for key, value in (("channels_last", channels_last), ("sdpa", sdpa), ("second_time", second_time)):
        require(isinstance(value, bool), f"model.{key}", value, "true or false")
    check_layout(image_size, base_channels, channel_mult, attention_resolutions, norm_groups, num_heads)


def check_layout(image_size: int, base_channels: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int],
                 norm_groups: int, num_heads: int = 1) -> None:
    """The U-Net's own shape rules, ConfigError naming the key: the image halves at each level but the last, attention
    goes at resolutions it has, and GroupNorm's groups and the attention heads divide every level's channels."""
    downsampling = 2 ** (len(channel_mult) - 1)
    if image_size % downsampling:
        raise ConfigError(f"data.image_size={image_size}: must be a multiple of the U-Net's downsampling factor {downsampling} "
                          "(2 ** (len(model.channel_mult) - 1))")
    resolutions = [image_size // 2**level for level in range(len(channel_mult))]
    unknown = sorted(set(attention_resolutions) - set(resolutions))
    if unknown:
        raise ConfigError(f"model.attention_resolutions={list(attention_resolutions)}: {unknown} not in the network's "
                          f"resolutions {resolutions} (data.image_size / 2^level for each level of model.channel_mult)")
    widths = sorted({base_channels * m for m in (1, *channel_mult)})
    if any(w % norm_groups for w in widths):
        raise ConfigError(f"model.norm_groups={norm_groups}: must divide every level's channels {widths} "
                          "(model.base_channels * model.channel_mult)")
    if any(w % num_heads for w in widths):
        raise ConfigError(f"model.num_heads={num_heads}: must divide every level's channels {widths} (each head is as "
                          "wide as the channels divided by the heads)")


class UNet(nn.Module):
    """The network of DDPM: ``forward(x, c_noise, labels, c_noise_r=None)`` returns a tensor shaped like ``x``, which
    the denoiser reads as its prediction target; ``second_time``: it embeds a second time r too (set by the objective,
    ``ddpm.builders``). Its constructor checks its settings (``check_settings``)."""

    speed_options = ("channels_last", "sdpa")  # how it computes, not what: a resumed run may switch them

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        norm_groups: int = 32,
        num_classes: int | None = None,
        channels_last: bool = False,
        sdpa: bool = True,
        second_time: bool = False,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        # in_channels, or twice it for a learned variance (set by ddpm.builders from diffusion.variance, never by hand)
        self.out_channels = in_channels if out_channels is None else out_channels
        # the layout, for whoever reads the network rather than runs it (ddpm/diffusers_export.py)
        self.channel_mult, self.num_res_blocks = tuple(channel_mult), num_res_blocks
        self.attention_resolutions, self.num_heads = tuple(attention_resolutions), num_heads
        self.norm_groups, self.dropout = norm_groups, dropout
        self.downsampling = 2 ** (len(channel_mult) - 1)
        check_settings(image_size, in_channels, base_channels, channel_mult, num_res_blocks, attention_resolutions, dropout,
                       num_heads, norm_groups, num_classes, channels_last, sdpa, second_time)
        require(integer(self.out_channels) and self.out_channels > 0, "model.out_channels", self.out_channels, "an integer > 0")
        resolutions = [image_size // 2**level for level in range(len(channel_mult))]

        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        # A second time r, for the objectives that ask for one (MeanFlow's u(z, r, t)): the gap c_noise(t) - c_noise(r)
        # embedded like t, through a zero-initialised last layer, so the network starts as the denoising one; absent
        # otherwise, so a denoising network and its checkpoints are unchanged.
        self.second_time = second_time
        self.gap_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                       zero_init(nn.Linear(emb_dim, emb_dim))) if second_time else None

        block = lambda i, o: ResBlock(i, o, emb_dim, dropout, norm_groups)  # noqa: E731
        attention = lambda c: AttentionBlock(c, num_heads, norm_groups, sdpa)  # noqa: E731

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [block(ch, base_channels * mult)]
                ch = base_channels * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle = nn.ModuleList([block(ch, ch), attention(ch), block(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [block(ch + skip_channels.pop(), base_channels * mult)]
                ch = base_channels * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(nn.ModuleList(layers))

        self.out = nn.Sequential(GroupNorm32(norm_groups, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1)))
        # NHWC activations let oneDNN/cuDNN pick faster convolution kernels; the math is unchanged.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    @property
    def null_label(self) -> int | None:
        """The class index meaning "unconditional" (Ho & Salimans 2022), or None for an unconditional net."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                c_noise_r: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.gap_embed is not None:  # r = t (no second time given): a gap of zero
            gap = torch.zeros_like(t) if c_noise_r is None else t - c_noise_r
            emb = emb + self.gap_embed(timestep_embedding(gap, self.base_channels).to(x.dtype))
        elif c_noise_r is not None:
            raise ValueError("this UNet embeds no second time r: build it with second_time=True (objective=meanflow)")
        if self.class_embed is not None:
            if labels is None:
                raise ValueError("this UNet is class-conditional: pass labels (use null_label for unconditional)")
            emb = emb + self.class_embed(labels)

        h = self.conv_in(x.contiguous(memory_format=self.memory_format))
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layers in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                h = layer(h, emb)
        return self.out(h)
