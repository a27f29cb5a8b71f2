"""The benchmark's building blocks (benchmarks/throughput.py; the full run is `make bench`, never a test)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402  (a script of benchmarks/, outside the package)
from throughput import NETWORKS, Options, ddpm_impl, default_options, diffusers_impl, matmul_roof  # noqa: E402


# (premise changed, issue 32: the speed switches are each backbone's own, Options.switches, not U-Net fields)
@pytest.mark.parametrize("network, options", [
    ("tiny", Options()),
    ("tiny", Options(switches=(("channels_last", False), ("sdpa", False)), fused=False, batched_guidance=False, bf16=True)),
    ("dit", Options(switches=(("sdpa", False),), bf16=True)),
])
def test_ddpm_side_runs_a_training_step_and_a_guided_sample(network, options):
    net, train_step, sample = ddpm_impl(network, 4, "cpu", options)
    before = [p.detach().clone() for p in net.parameters()]
    train_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the optimizer moved the weights
    sample(2, steps=2)


def test_matmul_roof_is_the_products_flops_over_its_median_time(monkeypatch):
    clock = iter([0.0, 0.1, 1.0, 1.5, 2.0, 2.25])  # three timed products: 0.1 s, 0.5 s, 0.25 s; median 0.25 s
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    assert matmul_roof(torch.float32, "cpu", n=64, repeats=3) == pytest.approx(2 * 64**3 / 0.25 / 1e9)


def test_default_row_is_what_train_runs(tiny_cfg):
    """The bench's "default" row uses the switches ddpm.train composes for the same network."""
    from ddpm.config import resolve_precision

    cfg = tiny_cfg()
    resolve_precision(cfg)
    options = default_options("tiny", "cpu")
    assert dict(options.switches) == {name: cfg.model[name] for name in ("channels_last", "sdpa")}  # the U-Net's own
    assert (options.compile_net, options.fused, options.bf16) == (
        cfg.model.compile, cfg.optim.optimizer.fused, cfg.trainer.precision == "bf16-mixed")


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_diffusers_network_has_the_same_layout(network):
    pytest.importorskip("diffusers")
    ours = ddpm_impl(network, 2, "cpu")[0]
    theirs = diffusers_impl(network, 2, "cpu", bf16=False)[0]
    extra = 0
    if type(ours).__name__ == "DiT":  # (premise added, issue 32) diffusers' DiT repeats the time and class embedder
        extra = (ours.depth - 1) * sum(p.numel() for m in (ours.time_embed, ours.class_embed) for p in m.parameters())
    assert sum(p.numel() for p in ours.parameters()) + extra == sum(p.numel() for p in theirs.parameters())


def test_data_path_rows_are_batches_over_the_median_time(monkeypatch):
    from throughput import bench_data

    times = iter([2.0, 4.0, 3.0, 1.0, 9.0, 5.0])  # medians 3.0 (loader), 5.0 (on device)
    monkeypatch.setattr(throughput, "_time", lambda fn, device: (fn(), next(times))[1])
    rows = bench_data("cpu", batches=3, batch=16)
    assert rows == [{"data.on_device": False, "batches_s": 1.0}, {"data.on_device": True, "batches_s": 0.6}]


def test_the_process_bench_runs_every_process():
    """benchmarks/processes.py: one training step and one sampling call of each process (its numbers are the bench's)."""
    import processes as bench  # noqa: E402  (benchmarks/processes.py)

    for name in bench.ARMS:
        train_step, sample = bench.arm(name, 4)
        assert train_step() > 0 and sample(2) > 0
