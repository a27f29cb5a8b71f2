import pytest
import torch

from ddpm.core.errors import ConfigError

from ddpm.core.unet import AttentionBlock, GroupNorm32, UNet


def count(net):
    return sum(p.numel() for p in net.parameters())


def test_ddpm_cifar10_network_has_35_7m_parameters():
    """Ho et al. 2020 report 35.7M parameters for their CIFAR-10 model."""
    kwargs = dict(image_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                  attention_resolutions=(16,), dropout=0.1)
    unconditional = UNet(**kwargs)
    assert count(unconditional) == pytest.approx(35.7e6, rel=0.002)
    # the class embedding adds (10 + 1) x 512: ten classes and the null label
    assert count(UNet(**kwargs, num_classes=10)) - count(unconditional) == 11 * 512


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_shapes(channels_last):
    net = UNet(8, 1, 16, (1, 2), 1, (4,), 0.0, norm_groups=4, num_classes=10, channels_last=channels_last)
    x = torch.randn(3, 1, 8, 8)
    assert net(x, torch.tensor([0, 5, 999]), torch.tensor([0, 9, 10])).shape == x.shape
    with pytest.raises(ValueError, match="labels"):
        net(x, torch.tensor([0, 5, 999]))


def test_labels_and_time_change_the_output():
    torch.manual_seed(0)
    net = UNet(8, 1, 16, (1, 2), 1, (), 0.0, norm_groups=4, num_classes=10)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 8, 8)
    base = net(x, torch.tensor([10]), torch.tensor([3]))
    assert not torch.allclose(base, net(x, torch.tensor([10]), torch.tensor([4])))
    assert not torch.allclose(base, net(x, torch.tensor([500]), torch.tensor([3])))


def test_bad_sizes_name_the_config_key():
    """The U-Net owns its shape rules (ConfigError, a ValueError); validation reaches them by building the network on
    the meta device (premise changed, issue 22: the wording is now the one message both paths print)."""
    with pytest.raises(ConfigError, match="data.image_size=10: must be a multiple of the U-Net's downsampling factor 4"):
        UNet(10, 1, 16, (1, 2, 2), 1, ())
    with pytest.raises(ConfigError, match=r"model.attention_resolutions=\[3\]"):
        UNet(8, 1, 16, (1, 2), 1, (3,))
    with pytest.raises(ConfigError, match=r"model.norm_groups=5: must divide every level's channels \[16, 32\]"):
        UNet(8, 1, 16, (1, 2), 1, (), norm_groups=5)


@pytest.mark.parametrize("overrides,line", [
    (["data.image_size=9"], "data.image_size=9: must be a multiple of the U-Net's downsampling factor 2"),
    (["model.attention_resolutions=[3]"], "model.attention_resolutions=[3]: [3] not in the network's resolutions [8, 4]"),
    (["model.norm_groups=5"], "model.norm_groups=5: must divide every level's channels"),
])
def test_validation_reports_the_networks_own_rule_in_one_line(overrides, line, tiny_cfg):
    from ddpm.validation import validate

    with pytest.raises(ConfigError) as error:
        validate(tiny_cfg(*overrides), "train")
    assert str(error.value).startswith(line) and "\n" not in str(error.value)


def test_another_backbone_is_checked_by_its_own_constructor_not_the_unets(tiny_cfg, monkeypatch):
    """A model option whose network has no channel_mult: no U-Net rule applies to it; its own constructor's ConfigError
    is the one line."""
    from ddpm import validation

    def constructor(model, **kwargs):
        raise ConfigError("model.width=3: my network wants an even width")

    monkeypatch.setattr("ddpm.builders.build_net", constructor)
    cfg = tiny_cfg("data.image_size=9")  # not a multiple of the U-Net's 2: irrelevant to this network
    with pytest.raises(ConfigError, match=r"\Amodel.width=3: my network wants an even width\Z"):
        validation.validate(cfg, "train")


def test_both_attention_paths_compute_softmax_qk_v():
    """sdpa=True (PyTorch's fused kernel) and sdpa=False (written out) against Vaswani et al. eq. 1 summed by hand,
    in float64, with two heads."""
    torch.manual_seed(0)
    blocks = [AttentionBlock(8, num_heads=2, groups=2, sdpa=sdpa).double() for sdpa in (True, False)]
    blocks[1].load_state_dict(blocks[0].state_dict())
    for p in blocks[0].proj.parameters():  # zero-initialised: give the output projection weights to test through
        torch.nn.init.normal_(p)
    blocks[1].load_state_dict(blocks[0].state_dict())
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)

    block = blocks[0]
    q, k, v = block.qkv(block.norm(x)).reshape(2, 3, 2, 4, 9).unbind(1)  # (batch, head, d, pixel)
    expected = torch.zeros(2, 2, 4, 9, dtype=torch.float64)
    for i in range(9):
        weights = torch.softmax((q[..., i, None] * k).sum(2) / 2.0, dim=-1)  # sqrt(d) = 2
        expected[..., i] = (weights[:, :, None, :] * v).sum(-1)
    expected = x + block.proj(expected.reshape(2, 8, 3, 3))
    for block in blocks:
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_groupnorm_runs_in_float32_under_bf16():
    norm = GroupNorm32(2, 4)
    x = torch.randn(2, 4, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.nn.functional.group_norm(x.float(), 2, norm.weight, norm.bias))
    assert norm.double()(x.double()).dtype == torch.float64  # a float64 network stays float64
