"""The DiT backbone (issue 32, items 1, 4 and 7 in part): DiT's parameter counts, adaLN-Zero's zero output at
initialisation, attention through SDPA against the formula in float64, exact patchify/unpatchify, the null class row,
every process training and sampling with it, and bad settings refused in one line."""

import math

import pytest
import torch
from conftest import TINY

from ddpm.config import compose
from ddpm.core.dit import DiT, patchify, sincos_position_embedding, unpatchify
from ddpm.core.errors import ConfigError


@pytest.mark.parametrize("size, hidden, depth, heads, millions", [("S", 384, 12, 6, 33), ("B", 768, 12, 12, 130),
                                                                 ("L", 1024, 24, 16, 458), ("XL", 1152, 28, 16, 675)])
def test_parameter_counts_are_dits_table_1(size, hidden, depth, heads, millions):
    """At DiT's own settings (4 x 32 x 32 latents, patch 2, 1,000 classes, learned sigma): Table 1's counts within 1%.
    Built on the meta device: no memory, no compute."""
    with torch.device("meta"):
        net = DiT(32, 4, 2, hidden, depth, heads, num_classes=1000, learn_sigma=True)
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.01), (size, count)


@pytest.mark.parametrize("learn_sigma, second_time", [(False, False), (True, False), (False, True)])
def test_adaln_zero_makes_the_output_exactly_zero_at_initialisation(learn_sigma, second_time):
    torch.manual_seed(0)
    net = DiT(8, 3, 2, 64, 3, 4, num_classes=10, learn_sigma=learn_sigma, second_time=second_time)
    x = torch.randn(5, 3, 8, 8)
    out = net(x, torch.tensor([0, 10, 500, 999, 3]), torch.tensor([0, 3, 9, 10, 10]),
              **({"c_noise_r": torch.tensor([0, 5, 5, 5, 1])} if second_time else {}))
    assert out.shape == (5, 6 if learn_sigma else 3, 8, 8) and torch.equal(out, torch.zeros_like(out))


def test_attention_through_sdpa_is_softmax_qk_v_in_float64():
    """Both of the DiT's attention paths against softmax(Q K^T / sqrt(d)) V written here head by head."""
    torch.manual_seed(1)
    net = DiT(8, 1, 2, 32, 1, 4, num_classes=None, sdpa=True).double()
    attention = net.blocks[0].attn
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    q, k, v = attention.qkv(x).split(32, dim=-1)
    heads = []
    for h in range(4):
        qh, kh, vh = (m[..., h * 8:(h + 1) * 8] for m in (q, k, v))
        heads.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(8), dim=-1) @ vh)
    expected = attention.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attention(x), expected, rtol=1e-12, atol=1e-12)
    attention.sdpa = False
    torch.testing.assert_close(attention(x), expected, rtol=1e-12, atol=1e-12)
    attention.sdpa = "auto"
    torch.testing.assert_close(attention(x), expected, rtol=1e-12, atol=1e-12)


def test_sdpa_auto_writes_attention_out_only_where_autograd_runs_on_a_cpu(monkeypatch):
    """model.sdpa=auto (the DiT presets' speed setting): the fused kernel's CPU backward is the slow one, so a CPU
    forward under autograd is written out, a CPU forward without it (sampling) is fused."""
    import ddpm.core.dit as dit

    calls = []
    fused = dit.F.scaled_dot_product_attention
    monkeypatch.setattr(dit.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    attention = DiT(8, 1, 2, 32, 1, 4, num_classes=None, sdpa="auto").blocks[0].attn
    x = torch.randn(2, 16, 32)
    attention(x)
    assert calls == []
    with torch.no_grad():
        attention(x)
    assert calls == [1]


def test_patchify_and_unpatchify_round_trip_exactly_and_tokens_are_row_major_patches():
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    for p in (1, 2, 4, 7, 14):
        tokens = patchify(x, p)
        assert tokens.shape == (2, (28 // p) ** 2, p * p * 3) and torch.equal(unpatchify(tokens, p, 3), x)
    tokens = patchify(x, 4)
    assert torch.equal(tokens[1, 7 + 2].view(4, 4, 3).permute(2, 0, 1), x[1, :, 4:8, 8:12])  # row 1, column 2 of a 7x7 grid


def test_the_position_embedding_is_sin_cos_of_the_column_then_the_row():
    table = sincos_position_embedding(8, 3)
    row, column = 1, 2  # token 5 of a 3x3 grid
    omega = [1.0, 0.01]  # 1 / 10000^(k / 2), k = 0, 1
    expected = [math.sin(column * w) for w in omega] + [math.cos(column * w) for w in omega] + \
               [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    assert table[5].tolist() == pytest.approx(expected, abs=1e-7)


def test_the_null_row_of_the_class_embedding_is_what_label_dropout_writes():
    from ddpm.core.guidance.common import drop_labels

    net = DiT(8, 1, 2, 32, 1, 4, num_classes=10)
    assert net.null_label == 10 and net.class_embed.num_embeddings == 11
    dropped = drop_labels(torch.arange(10).repeat(100), 0.5, net.null_label)
    assert set(dropped.unique().tolist()) == set(range(11))
    net.class_embed(dropped)  # every label, the null one included, has its row


@pytest.mark.parametrize("backbone, name", [("dit_tiny", "DiT"), ("vit_pixel_tiny", "PixelViT")])
@pytest.mark.parametrize("process", ["ddpm", "flow", "edm", "trigflow"])
def test_every_process_trains_and_samples_with_the_dit(process, backbone, name, tmp_path):
    """Every process x transformer backbone (the DiT and the pixel ViT) trains a few steps, writes its grid, loads
    and samples."""
    from ddpm.inference import load
    from ddpm.train import train

    overrides = TINY if process == "ddpm" else [o for o in TINY if not o.startswith("schedule.")] + [f"process={process}"]
    overrides = [o for o in overrides if not o.startswith(("model.base_channels", "model.norm_groups"))]
    run = tmp_path / "run"
    train(compose([*overrides, f"model={backbone}", "model.hidden_size=32", "model.depth=2", "trainer.max_steps=3",
                   "callbacks.sample_grid.steps=2", "callbacks.sample_grid.per_class=1", "ema.snapshot_count=0"],
                  output_dir=run))
    assert (run / "samples" / "final.png").is_file()
    model = load(run / "checkpoints" / "last.ckpt", device="cpu")
    assert type(model.net).__name__ == name
    images = model.sample([0, 5], sampler="ddim" if process == "ddpm" else "heun", steps=3, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_meanflows_second_time_reaches_the_dit(tmp_path):
    from ddpm.train import train

    overrides = [o for o in TINY if not o.startswith(("schedule.", "model.base_channels", "model.norm_groups"))]
    module = train(compose([*overrides, "process=flow", "objective=meanflow", "model=dit_tiny", "model.hidden_size=32",
                            "model.depth=2", "trainer.max_steps=2", "~callbacks.sample_grid", "ema.snapshot_count=0"],
                           output_dir=tmp_path / "run"))
    assert module.net.second_time and module.net.gap_embed is not None


@pytest.mark.parametrize("overrides, message", [
    (["model.patch_size=3"], r"model.patch_size=3: must be a divisor of data.image_size=8"),
    (["model.num_heads=5"], r"model.num_heads=5: must be a divisor of model.hidden_size=96"),
    # learn_sigma's second half is read by a learned variance now (issue 34): refused only with a fixed one
    (["model.learn_sigma=true"], r"the network outputs 2 channels for 1 .*set diffusion.variance=learned_range"),
])
def test_bad_dit_settings_are_one_line_before_any_compute(overrides, message):
    from ddpm.validation import validate

    with pytest.raises(ConfigError, match=message) as error:
        validate(compose(["model=dit_tiny", *overrides]), "train")
    assert "\n" not in str(error.value)


def test_speed_plain_sets_each_backbones_own_switches_and_writes_no_other_key():
    """conf/speed/plain.yaml names no backbone's key: each conf/model/ file says its switches' two values
    (${ddpm_speed:FAST,PLAIN}), and a resumed run may change exactly the switches its backbone declares."""
    from omegaconf import OmegaConf

    from ddpm.config import build_network
    from ddpm.training.checkpoint import speed_keys

    fast, plain = compose([]).model, compose(["speed=plain"]).model
    assert (fast.channels_last, fast.sdpa, plain.channels_last, plain.sdpa) == (True, False, False, True)
    dit = compose(["model=dit_tiny", "speed=plain"])
    assert "channels_last" not in dit.model and dit.model.sdpa is True
    assert type(build_network("model=dit_tiny", "speed=plain")).__name__ == "DiT"
    plain_dict = OmegaConf.to_container(compose(["speed=plain"]), resolve=True)
    assert speed_keys(plain_dict) == {"model.compile", "model.channels_last", "model.sdpa"}
    assert speed_keys(OmegaConf.to_container(dit, resolve=True)) == {"model.compile", "model.sdpa"}
    assert speed_keys({"model": {"_target_": "builtins.eval"}}) == {"model.compile"}  # not a shipped backbone


def test_a_dit_exports_to_diffusers_dit_transformer_and_computes_the_same():
    """diffusers' DiTTransformer2DModel built from the export computes what the DiT computes (random weights: the
    zero-initialised layers perturbed, else both outputs are 0), to 1e-5 as the U-Net's export; refusals in one line."""
    pytest.importorskip("diffusers")
    from ddpm.diffusers_export import to_dit_transformer

    torch.manual_seed(2)
    net = DiT(8, 3, 2, 64, 2, 4, num_classes=10).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = to_dit_transformer(net)
    x, t, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 17, 500, 999]), torch.tensor([0, 4, 9, 10])
    with torch.no_grad():
        expected = net(x, t, labels)
        got = theirs(x, timestep=t, class_labels=labels).sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="unconditional DiT"):
        to_dit_transformer(DiT(8, 3, 2, 64, 1, 4, num_classes=None))
    with pytest.raises(ConfigError, match="second time"):
        to_dit_transformer(DiT(8, 3, 2, 64, 1, 4, num_classes=10, second_time=True))


def test_the_export_command_writes_a_dit_checkpoint_as_a_transformer_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ddpm.export import export
    from ddpm.inference import load
    from ddpm.train import train

    overrides = [o for o in TINY if not o.startswith(("model.base_channels", "model.norm_groups"))]
    train(compose([*overrides, "model=dit_tiny", "model.hidden_size=32", "model.depth=2", "trainer.max_steps=2",
                   "~callbacks.sample_grid", "ema.snapshot_count=0"], output_dir=tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    export(compose([f"ckpt_path={checkpoint}", f"out={out}"], config_name="export"))
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(out / "transformer")
    model = load(checkpoint, device="cpu")
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 40, 99]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        torch.testing.assert_close(transformer(x, timestep=t, class_labels=labels).sample, model.net(x, t, labels),
                                   rtol=1e-5, atol=1e-5)
    assert (out / "scheduler" / "scheduler_config.json").is_file() and not (out / "unet").exists()


def test_the_pixel_vits_patch_embedding_is_linear_through_its_bottleneck_and_it_starts_at_zero():
    """JiT's patch embedding: each patch's p^2 C values to a token by a linear map of rank <= bottleneck (two linear
    layers, no non-linearity between: embedding a sum is the sum of embeddings); the output is exactly zero at
    initialisation (adaLN-Zero, as the DiT)."""
    from ddpm.core.vit_pixel import PixelViT

    torch.manual_seed(0)
    net = PixelViT(28, 1, patch_size=14, hidden_size=64, depth=2, num_heads=4, num_classes=10, bottleneck=8).double()
    x, y = torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.randn(2, 1, 28, 28, dtype=torch.float64)
    embed = lambda v: net.patch_embed(v) - net.patch_embed(torch.zeros_like(v))  # noqa: E731 (less the bias)
    torch.testing.assert_close(embed(x + 2 * y), embed(x) + 2 * embed(y), rtol=1e-10, atol=1e-10)
    patches = torch.eye(196, dtype=torch.float64).view(196, 1, 14, 14)  # one patch per basis vector of a patch
    matrix = embed(torch.nn.functional.pad(patches, (0, 14, 0, 14)))[:, :, 0, 0]  # (196 values, 64 widths)
    assert torch.linalg.matrix_rank(matrix).item() == 8
    out = net(x, torch.tensor([1.0, 900.0], dtype=torch.float64), torch.tensor([3, 10]))
    assert out.shape == x.shape and out.abs().max().item() == 0.0


def test_the_pixel_vits_preset_has_jits_wide_patches():
    """vit_pixel_s on 28x28: a patch holds more values than a token is wide (JiT's setting)."""
    from ddpm.config import build_network

    net = build_network("model=vit_pixel_s", "data=fashion_mnist")
    assert net.patch_size ** 2 * net.in_channels > net.hidden_size and net.bottleneck < net.hidden_size


def test_the_export_refuses_the_pixel_vit_in_one_line():
    """A DiT subclass with another patch embedding has no DiTTransformer2DModel layout: refused, not mis-mapped."""
    from ddpm.config import build_network
    from ddpm.diffusers_export import to_diffusers_network

    with pytest.raises(ConfigError, match="PixelViT has no diffusers equivalent") as error:
        to_diffusers_network(build_network("model=vit_pixel_tiny"))
    assert "\n" not in str(error.value)
