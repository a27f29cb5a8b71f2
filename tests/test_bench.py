"""The benchmark's building blocks (the full run is `make bench`, never a test)."""

import pytest
import torch

from ddpm.bench import NETWORKS, ddpm_impl, diffusers_impl, matmul_roof


def test_ddpm_side_runs_a_training_step_and_a_guided_sample():
    net, train_step, sample = ddpm_impl("tiny", 4, "cpu", channels_last=True, bf16=False, compile_net=False)
    before = [p.detach().clone() for p in net.parameters()]
    train_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the optimizer moved the weights
    sample(2, steps=2)
    assert matmul_roof(torch.float32, "cpu", n=128, repeats=2) > 0


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_diffusers_network_has_the_same_layout(network):
    pytest.importorskip("diffusers")
    ours = ddpm_impl(network, 2, "cpu", channels_last=False, bf16=False, compile_net=False)[0]
    theirs = diffusers_impl(network, 2, "cpu", bf16=False)[0]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
