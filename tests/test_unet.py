import pytest
import torch

from ddpm.unet import UNet


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
    with pytest.raises(ValueError, match="data.image_size=10 must be divisible"):
        UNet(10, 1, 16, (1, 2, 2), 1, ())
    with pytest.raises(ValueError, match=r"model.attention_resolutions=\[3\]"):
        UNet(8, 1, 16, (1, 2), 1, (3,))
