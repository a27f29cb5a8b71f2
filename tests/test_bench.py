"""The benchmark's building blocks (the full run is `make bench`, never a test)."""

import pytest
import torch

from ddpm.bench import NETWORKS, Options, ddpm_impl, default_options, diffusers_impl, matmul_roof


@pytest.mark.parametrize("options", [Options(), Options(channels_last=False, sdpa=False, fused=False, batched_guidance=False, bf16=True)])
def test_ddpm_side_runs_a_training_step_and_a_guided_sample(options):
    net, train_step, sample = ddpm_impl("tiny", 4, "cpu", options)
    before = [p.detach().clone() for p in net.parameters()]
    train_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the optimizer moved the weights
    sample(2, steps=2)
    assert matmul_roof(torch.float32, "cpu", n=128, repeats=2) > 0


def test_default_row_is_what_train_runs(tiny_cfg):
    """The bench's "default" row uses the switches ddpm.train composes for the same network."""
    from ddpm.config import resolve_precision

    cfg = tiny_cfg()
    resolve_precision(cfg)
    options = default_options("tiny", "cpu")
    assert (options.channels_last, options.sdpa, options.compile_net, options.fused, options.bf16) == (
        cfg.model.channels_last, cfg.model.sdpa, cfg.model.compile, cfg.optim.optimizer.fused, cfg.trainer.precision == "bf16-mixed")


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_diffusers_network_has_the_same_layout(network):
    pytest.importorskip("diffusers")
    ours = ddpm_impl(network, 2, "cpu")[0]
    theirs = diffusers_impl(network, 2, "cpu", bf16=False)[0]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_data_path_rows():
    from ddpm.bench import bench_data

    rows = bench_data("cpu", batches=3, batch=16)
    assert [r["data.on_device"] for r in rows] == [False, True] and all(r["batches_s"] > 0 for r in rows)
