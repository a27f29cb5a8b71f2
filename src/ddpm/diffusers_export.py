"""A ddpm model as HuggingFace diffusers' ``UNet2DModel`` (or, for a DiT, ``DiTTransformer2DModel``) and
``DDIMScheduler``, weight for weight.

The DiT (``core/dit.py``) maps block for block onto ``DiTTransformer2DModel``: the fused q, k, v projection split in
three, diffusers' per-block copies of the time and class embedders all set to ours, the same noise embedding (ours
uses diffusers' frequencies for this). An unconditional DiT, one with a second time (MeanFlow) or an MLP not 4x wide
has no equivalent and is refused in one line.

ddpm's U-Net (``core/unet.py``) is the DDPM network diffusers' ``UNet2DModel`` also implements: the same sinusoidal
embedding (sin first: ``flip_sin_to_cos=False``, ``freq_shift=0``), residual blocks, single-head attention, nearest
upsampling and stride-2 downsampling, so a layout maps onto a ``UNet2DModel`` config and every tensor onto one of its
tensors. Two layouts have no ``UNet2DModel`` equivalent and are refused in one line: a first level wider than
``base_channels`` (``channel_mult[0] != 1``: diffusers' stem and time embedding are as wide as the first level), and
several heads over levels of different widths (diffusers fixes the head *width*, ddpm the head *count*).

The schedule is written by name where diffusers builds the same alpha_bar (``linear``, ``squaredcos_cap_v2`` for the
cosine, ``rescale_betas_zero_snr``), checked against ours at export time, and as ``trained_betas`` otherwise (the
sigmoid schedule: diffusers' ``sigmoid`` is a different curve). diffusers holds betas in float32.

Guidance, for a class-conditional model: the unconditional prediction is ``class_labels=null_label`` (the export's
``ddpm_export.json`` records it), and ddpm's ``(1 + w) cond - w uncond`` is diffusers' ``guidance_scale = 1 + w``.

diffusers is imported only by the functions that need it (``pip install -e ".[export]"``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.core.dit import DiT
from ddpm.core.errors import ConfigError
from ddpm.core.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample
from ddpm.files import WriteError, write_failure

FORMATS = ("diffusers",)
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # ddpm's target -> diffusers' prediction_type
# A named diffusers schedule is used only where its alpha_bar matches ours this closely: diffusers' float32 betas put
# the linear, cosine and zero-terminal-SNR schedules within 6e-7 of ours at T = 1000 (as trained_betas do); another
# curve is off by far more (the sigmoid one by 0.47 under any named schedule).
SCHEDULE_TOLERANCE = 2e-6


def check_expressible(net: nn.Module) -> None:
    """ConfigError, one line, when ``net`` has no ``UNet2DModel`` equivalent."""
    if not isinstance(net, UNet):
        raise ConfigError(f"format=diffusers: ddpm's U-Net maps onto diffusers' UNet2DModel and its DiT onto "
                          f"DiTTransformer2DModel; {type(net).__module__}.{type(net).__qualname__} has no diffusers equivalent")
    if net.channel_mult[0] != 1:
        raise ConfigError(f"format=diffusers: model.channel_mult={list(net.channel_mult)} starts at {net.channel_mult[0]}: "
                          "UNet2DModel's stem is as wide as its first level, so the first multiplier must be 1")
    widths = {block.qkv.in_channels for block in net.modules() if isinstance(block, AttentionBlock)}
    if net.num_heads > 1 and len(widths) > 1:
        raise ConfigError(f"format=diffusers: model.num_heads={net.num_heads} over attention layers of widths "
                          f"{sorted(widths)}: UNet2DModel fixes the width of a head, not the number of heads, so several "
                          "heads need attention at one width only (or model.num_heads=1)")


def unet_config(net: UNet) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of ``net``'s layout."""
    check_expressible(net)
    attention_widths = {block.qkv.in_channels for block in net.modules() if isinstance(block, AttentionBlock)}
    levels = range(len(net.channel_mult))
    attended = [net.image_size // 2**level in net.attention_resolutions for level in levels]
    return {
        "sample_size": net.image_size, "in_channels": net.in_channels, "out_channels": net.in_channels,
        "block_out_channels": [net.base_channels * m for m in net.channel_mult],
        "layers_per_block": net.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attended],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended)],
        "mid_block_type": "UNetMidBlock2D", "add_attention": True,
        # None: one head as wide as its layer, at every width (ddpm's num_heads=1)
        "attention_head_dim": None if net.num_heads == 1 else attention_widths.pop() // net.num_heads,
        "norm_num_groups": net.norm_groups, "norm_eps": 1e-5, "dropout": net.dropout, "act_fn": "silu",
        "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 0,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "num_class_embeds": None if net.num_classes is None else net.num_classes + 1,
    }


def _linear(name: str, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 1x1 convolution's parameters as a Linear layer's (diffusers' attention projections are Linear)."""
    return {f"{name}.weight": weight.reshape(weight.shape[0], weight.shape[1]), f"{name}.bias": bias}


def _resblock(ours: str, theirs: str, block: ResBlock, state: dict) -> dict[str, torch.Tensor]:
    names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}
    return {f"{theirs}.{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": state[f"{ours}.{k}"]
            for k, _ in block.named_parameters()}


def _attention(ours: str, theirs: str, state: dict) -> dict[str, torch.Tensor]:
    mapped = {f"{theirs}.group_norm.{p}": state[f"{ours}.norm.{p}"] for p in ("weight", "bias")}
    # ddpm's qkv is one 1x1 convolution whose outputs are q, k and v stacked (each heads x head width): split in three
    for part, weight, bias in zip(("to_q", "to_k", "to_v"), state[f"{ours}.qkv.weight"].chunk(3), state[f"{ours}.qkv.bias"].chunk(3)):
        mapped |= _linear(f"{theirs}.{part}", weight, bias)
    return mapped | _linear(f"{theirs}.to_out.0", state[f"{ours}.proj.weight"], state[f"{ours}.proj.bias"])


def _layers(ours: str, theirs: str, layers: nn.ModuleList, state: dict, index: int) -> dict[str, torch.Tensor]:
    """One entry of ddpm's down/up lists (a residual block, maybe attention, maybe a resampler) as block ``theirs``'s
    ``index``-th layer."""
    mapped = {}
    for position, layer in enumerate(layers):
        name = f"{ours}.{position}"
        if isinstance(layer, ResBlock):
            mapped |= _resblock(name, f"{theirs}.resnets.{index}", layer, state)
        elif isinstance(layer, AttentionBlock):
            mapped |= _attention(name, f"{theirs}.attentions.{index}", state)
        elif isinstance(layer, (Downsample, Upsample)):
            kind = "downsamplers" if isinstance(layer, Downsample) else "upsamplers"
            mapped |= {f"{theirs}.{kind}.0.conv.{p}": state[f"{name}.conv.{p}"] for p in ("weight", "bias")}
    return mapped


def unet_state_dict(net: UNet) -> dict[str, torch.Tensor]:
    """``net``'s weights under ``UNet2DModel``'s names (its ``unet_config``), every tensor contiguous float32 on CPU."""
    check_expressible(net)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    pair = lambda ours, theirs: {f"{theirs}.{p}": state[f"{ours}.{p}"] for p in ("weight", "bias")}  # noqa: E731
    mapped = {**pair("time_embed.0", "time_embedding.linear_1"), **pair("time_embed.2", "time_embedding.linear_2"),
              **pair("conv_in", "conv_in"), **pair("out.0", "conv_norm_out"), **pair("out.2", "conv_out")}
    if net.class_embed is not None:
        mapped["class_embedding.weight"] = state["class_embed.weight"]
    entry = 0
    for level in range(len(net.channel_mult)):  # ddpm's flat list: num_res_blocks entries, then a Downsample entry
        for j in range(net.num_res_blocks):
            mapped |= _layers(f"down.{entry}", f"down_blocks.{level}", net.down[entry], state, j)
            entry += 1
        if level != len(net.channel_mult) - 1:
            mapped |= _layers(f"down.{entry}", f"down_blocks.{level}", net.down[entry], state, 0)
            entry += 1
    mapped |= _resblock("middle.0", "mid_block.resnets.0", net.middle[0], state)
    mapped |= _attention("middle.1", "mid_block.attentions.0", state)
    mapped |= _resblock("middle.2", "mid_block.resnets.1", net.middle[2], state)
    for entry, layers in enumerate(net.up):  # num_res_blocks + 1 entries per level, deepest level first
        block, index = divmod(entry, net.num_res_blocks + 1)
        mapped |= _layers(f"up.{entry}", f"up_blocks.{block}", layers, state, index)
    return mapped


def to_unet2d(net: UNet):
    """A diffusers ``UNet2DModel`` computing what ``net`` computes (to float32 rounding)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet_config(net))
    unet.load_state_dict(unet_state_dict(net), strict=True)  # every tensor of theirs set, no tensor of ours left over
    return unet.eval()


# --- the DiT as diffusers' DiTTransformer2DModel ---------------------------------------------------------------------
def check_dit_expressible(net: DiT) -> None:
    """ConfigError, one line, when ``net`` has no ``DiTTransformer2DModel`` equivalent: diffusers' DiT is class-conditional
    (its adaLN-Zero needs class embeddings) and embeds one time only."""
    if net.num_classes is None:
        raise ConfigError("format=diffusers: an unconditional DiT (model.num_classes=null) has no DiTTransformer2DModel "
                          "equivalent: diffusers' DiT always embeds a class label")
    if net.second_time:
        raise ConfigError("format=diffusers: a DiT with a second time r (objective=meanflow) has no DiTTransformer2DModel "
                          "equivalent: diffusers' DiT embeds one time")


def dit_config(net: DiT) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` keyword arguments of ``net``: the null label is diffusers' label-dropout row, so
    ``num_embeds_ada_norm`` is the number of real classes; LayerNorm eps 1e-6 as DiT's."""
    mlp_ratio = net.blocks[0].mlp[0].out_features / net.hidden_size
    if mlp_ratio != 4:
        raise ConfigError(f"format=diffusers: model.mlp_ratio={mlp_ratio:g}: DiTTransformer2DModel's feed-forward is 4x wide")
    return {"num_attention_heads": net.num_heads, "attention_head_dim": net.hidden_size // net.num_heads,
            "in_channels": net.in_channels, "out_channels": net.out_channels, "num_layers": net.depth,
            "sample_size": net.image_size, "patch_size": net.patch_size, "num_embeds_ada_norm": net.num_classes,
            "activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "attention_bias": True, "dropout": 0.0}


def dit_state_dict(net: DiT) -> dict[str, torch.Tensor]:
    """Every tensor of ``net`` under diffusers' names: the patch embedding, each block's attention (q, k, v split out
    of the fused projection), feed-forward and adaLN-Zero modulation, the final layer; diffusers keeps a copy of the
    time and class embedders in every block (block 0's also conditions the final layer), so each block gets ours."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    embed = {"timestep_embedder.linear_1.weight": state["time_embed.0.weight"],
             "timestep_embedder.linear_1.bias": state["time_embed.0.bias"],
             "timestep_embedder.linear_2.weight": state["time_embed.2.weight"],
             "timestep_embedder.linear_2.bias": state["time_embed.2.bias"],
             "class_embedder.embedding_table.weight": state["class_embed.weight"]}
    mapped = {"pos_embed.proj.weight": state["patch_embed.weight"], "pos_embed.proj.bias": state["patch_embed.bias"],
              "proj_out_1.weight": state["final.adaLN_modulation.1.weight"],
              "proj_out_1.bias": state["final.adaLN_modulation.1.bias"],
              "proj_out_2.weight": state["final.linear.weight"], "proj_out_2.bias": state["final.linear.bias"]}
    for i in range(net.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        mapped.update({f"{theirs}norm1.emb.{k}": v.clone() for k, v in embed.items()})
        mapped[f"{theirs}norm1.linear.weight"] = state[f"{ours}adaLN_modulation.1.weight"]
        mapped[f"{theirs}norm1.linear.bias"] = state[f"{ours}adaLN_modulation.1.bias"]
        for name, weight, bias in zip(("to_q", "to_k", "to_v"), state[f"{ours}attn.qkv.weight"].chunk(3),
                                      state[f"{ours}attn.qkv.bias"].chunk(3)):
            mapped[f"{theirs}attn1.{name}.weight"], mapped[f"{theirs}attn1.{name}.bias"] = weight.clone(), bias.clone()
        mapped[f"{theirs}attn1.to_out.0.weight"] = state[f"{ours}attn.proj.weight"]
        mapped[f"{theirs}attn1.to_out.0.bias"] = state[f"{ours}attn.proj.bias"]
        for j, k in ((0, "0.proj"), (2, "2")):
            mapped[f"{theirs}ff.net.{k}.weight"] = state[f"{ours}mlp.{j}.weight"]
            mapped[f"{theirs}ff.net.{k}.bias"] = state[f"{ours}mlp.{j}.bias"]
    return mapped


def to_dit_transformer(net: DiT):
    """A diffusers ``DiTTransformer2DModel`` computing what ``net`` computes (to float32 rounding)."""
    from diffusers import DiTTransformer2DModel

    check_dit_expressible(net)
    transformer = DiTTransformer2DModel(**dit_config(net))
    transformer.load_state_dict(dit_state_dict(net), strict=True)  # every tensor of theirs set, none of ours left over
    return transformer.eval()


def to_diffusers_network(net: nn.Module) -> tuple[str, Any]:
    """(the folder name, the diffusers model) of a backbone: ``unet`` for the U-Net, ``transformer`` for a DiT; any
    other backbone is refused in one line."""
    if type(net) is DiT:  # exactly the DiT: a subclass (the pixel ViT's bottleneck embedding) has no diffusers layout
        return "transformer", to_dit_transformer(net)
    return "unet", to_unet2d(net)


def _clip_options(x0_clip: str, percentile: float) -> dict[str, Any]:
    """ddpm's ``sampler.x0_clip`` as DDIMScheduler's clipping options."""
    if x0_clip == "dynamic":  # Imagen's s = max(1, percentile of |x_0|), uncapped in ddpm
        return {"clip_sample": False, "thresholding": True, "dynamic_thresholding_ratio": percentile,
                "sample_max_value": 1e6}
    return {"clip_sample": x0_clip == "clip", "clip_sample_range": 1.0, "thresholding": False}


def scheduler_config(betas: torch.Tensor, schedule: dict, prediction: str, x0_clip: str = "clip",
                     percentile: float = 0.995) -> dict[str, Any]:
    """A ``DDIMScheduler`` config for this process: the schedule by name when diffusers builds the same alpha_bar
    (checked here), else its betas; the prediction target; DDIM's clipping as ``ddpm.sample sampler=ddim`` does it.

    ``timestep_spacing="linspace"`` lists the timesteps ddpm's DDIM visits (``sampling_timesteps``: both ends, evenly
    spread), so samples come closest to ddpm's: diffusers' DDIM then steps each t to t - T // steps rather than to the
    next t listed, which differs from ddpm's walk by under one index per step (docs/export.md measures the difference;
    ``trailing``, a walk consistent in itself, differs from ddpm's by 3-10x more)."""
    from diffusers import DDIMScheduler

    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"diffusion.prediction={prediction!r}: diffusers has no prediction_type for it "
                          f"(it has {sorted(PREDICTION_TYPES)})")
    betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
    target = str(schedule.get("_target_", "")).rsplit(".", 1)[-1]
    config: dict[str, Any] = {"num_train_timesteps": len(betas), "prediction_type": PREDICTION_TYPES[prediction],
                              "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "linspace",
                              **_clip_options(x0_clip, percentile)}
    named = None
    if target == "linear_betas":
        named = {"beta_schedule": "linear", "beta_start": float(schedule["beta_start"]), "beta_end": float(schedule["beta_end"])}
    elif target == "cosine_betas":
        named = {"beta_schedule": "squaredcos_cap_v2"}
    if named is not None:
        named["rescale_betas_zero_snr"] = bool(schedule.get("zero_terminal_snr", False))
        theirs = DDIMScheduler(**config, **named).alphas_cumprod.double()
        ours = torch.cumprod(1 - betas, 0)
        if len(theirs) == len(ours) and (theirs - ours).abs().max() <= SCHEDULE_TOLERANCE:
            return {**config, **named}
    return {**config, "beta_schedule": "linear", "trained_betas": betas.tolist()}


def check_out(out: str | Path) -> Path:
    """``out`` as an absolute path (``.`` and ``..`` resolved as written, links not followed), or ConfigError when it
    holds anything: an export never writes into an existing folder."""
    given = Path(out).expanduser()
    out = Path(os.path.abspath(given))
    if given.is_symlink() or out.is_symlink():  # the export renames a folder into place: never onto (or through) a link
        raise ConfigError(f"out={str(out)!r} is a symbolic link: name a real folder that does not exist yet (nothing was written)")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"out={str(out)!r} already exists and is not an empty folder: pick a new out (nothing was written)")
    return out


def export_diffusers(model, out: str | Path, x0_clip: str = "clip", percentile: float = 0.995) -> Path:
    """Write ``model`` (a ``ddpm.Pipeline``) as a diffusers folder at ``out``: ``unet/`` (config.json and safetensors),
    ``scheduler/scheduler_config.json``, ``ddpm_export.json`` (provenance and the guidance convention) and, for an
    unconditional model, ``model_index.json`` so ``DDIMPipeline.from_pretrained(out)`` loads it.

    All or nothing: written to a temporary folder beside ``out`` and renamed into place; ``out`` must not exist or be
    an empty folder, and nothing already there is touched."""
    import diffusers

    if not model.process.discrete:
        raise ConfigError(f"ckpt_path: a process={model.process.name} model has no DDIMScheduler: ddpm.export writes "
                          "process=ddpm models only (sample this one with ddpm.sample or ddpm.load)")
    if model.denoiser.learns_variance:
        raise ConfigError("ckpt_path: a model with diffusion.variance=learned_range has no DDIMScheduler equivalent (it "
                          "ignores a learned variance's channels): ddpm.export writes fixed-variance models only (sample "
                          "this one with ddpm.sample or ddpm.load)")
    out = check_out(out)
    folder, network = to_diffusers_network(model.net)  # refusals first, before anything is written
    scheduler = diffusers.DDIMScheduler(**scheduler_config(model.process.betas, (model.config or {}).get("schedule", {}),
                                                           model.denoiser.prediction, x0_clip, percentile))
    info = {"format": "diffusers", "diffusers_version": diffusers.__version__, "source": model.path, "step": model.step,
            "weights": model.weights, "prediction": model.denoiser.prediction, "null_label": model.net.null_label,
            "guidance": {"scale": model.guidance.scale, "rule": "(1 + w) * cond - w * uncond, uncond at "
                         "class_labels=null_label; diffusers' guidance_scale = 1 + w"},
            "schedule": (model.config or {}).get("schedule")}
    staging = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        staging.mkdir(parents=True)
    except OSError as error:
        raise WriteError(write_failure(out, error, "export")) from None
    try:
        network.save_pretrained(staging / folder, safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
        (staging / "ddpm_export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if model.net.num_classes is None and folder == "unet":  # diffusers' unconditional pipelines call unet(x, t)
            index = {"_class_name": "DDIMPipeline", "_diffusers_version": diffusers.__version__,
                     "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
            (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.rename(staging, out)  # atomic; refused if another export filled `out` meanwhile
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)  # only the folder this call created
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"out={str(out)!r} was filled by something else while exporting: pick a new out") from None
        raise WriteError(write_failure(out, error, "export")) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
