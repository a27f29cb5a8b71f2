"""`python benchmarks/throughput.py`: training and sampling throughput of ddpm's backbones against HuggingFace
diffusers' own model of the same layout and weights, measured side by side in one process.

Each network is a file of conf/model/ (``NETWORKS``: ``tiny`` unet_tiny and ``dit`` dit_tiny on 1x8x8 digits, of about
equal parameter counts; ``cifar10`` the DDPM CIFAR-10 U-Net and ``dit_s`` DiT-S/2 on 3x32x32), built as training
builds it; its diffusers counterpart is what ``ddpm.export`` writes for it (``UNet2DModel``,
``DiTTransformer2DModel``: the same weights, tested equal to 1e-5), so both compute the same function. It times
- the full training step (label dropout, noise, forward, L_simple, backward, AdamW, EMA), median over timed steps
  after warm-up, ddpm and diffusers alternating step by step so both see the same machine state;
- guided DDIM-50 sampling (conditional and unconditional passes) in images/s and model evaluations/s;
- peak memory (resident set on CPU, reset per row through /proc/self/clear_refs; allocated on GPU);
- FLOPs per training step (``torch.utils.flop_counter``, attention written out on both sides, so that the two
  counts can be compared: they must agree, as the same layout's) and the achieved rate, next to a matrix-product
  roof measured here in the same precision.
The first ddpm row is what ``python -m ddpm.train`` and ``ddpm.sample`` run on this machine (``default_options``: the
backbone's own speed switches as its YAML sets them, fused AdamW, trainer.precision=auto and sampler.precision=auto,
i.e. bf16 where it is native), the next its float32 version; ``--ablate`` adds one row per speed switch flipped alone
and ``--compile`` a torch.compile row. Each ratio is ddpm's speed over diffusers eager (float32, or bf16 with
--diffusers-bf16): the median of paired ratios, each diffusers step against the ddpm step timed just before it. A
second table times the digits batches reaching the device with and without ``data.on_device``. Needs ``pip install
-e ".[bench]"`` (diffusers). Prints markdown tables and writes them as JSON. A benchmark, never a test: numbers depend
on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F

from ddpm.config import build_network, compose, native_bf16
from ddpm.core.denoiser import Denoiser
from ddpm.core.guidance import drop_labels, guided
from ddpm.core.objectives.denoising import Denoising
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.samplers.ddim import sample_ddim
from ddpm.core.schedules import linear_betas
from ddpm.diffusers_export import to_diffusers_network
from ddpm.training.module import ema_step

NETWORKS = {  # name: the overrides that build it from conf/ (its model file, and the data that sizes it)
    "tiny": ("model=unet_tiny",),
    "dit": ("model=dit_tiny",),
    "cifar10": ("model=unet_cifar10", "data=cifar10"),
    "dit_s": ("model=dit_s", "data=cifar10"),
}
T, P_UNCOND, W = 1000, 0.1, 1.0


@dataclass
class Row:
    network: str
    impl: str
    options: str
    batch: int
    params: int
    train_ms: float = float("nan")
    train_img_s: float = float("nan")
    flops_per_step: float = float("nan")
    gflops_s: float = float("nan")
    roof_fraction: float = float("nan")
    sample_img_s: float = float("nan")
    nfe_s: float = float("nan")
    peak_mb: float = float("nan")
    ratio_train: float = float("nan")
    ratio_sample: float = float("nan")
    extra: dict = field(default_factory=dict)


def matmul_roof(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matrix product in ``dtype``: the machine's practical compute ceiling."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, bf16: bool):
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the resident-set high-water mark (VmHWM)


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# --- the two implementations, each as (train_step, sample) closures ------------------------------------------------
@dataclass(frozen=True)
class Options:
    """ddpm's speed settings: ``switches``, the backbone's own speed options (its class's ``speed_options``, as its
    YAML sets them), model.compile, bf16 (trainer.precision bf16-mixed and sampler.precision bf16),
    optim.optimizer.fused; batched_guidance (both halves of the guided eps in one forward) is how ddpm always
    samples, switchable here only to measure it."""

    switches: tuple[tuple[str, bool | str], ...] = ()
    bf16: bool = False
    compile_net: bool = False
    fused: bool = True
    batched_guidance: bool = True

    def settings(self) -> dict:
        return {**dict(self.switches), "bf16": self.bf16, "compile": self.compile_net, "fused": self.fused,
                "batched_guidance": self.batched_guidance}

    def flipped(self, name: str) -> list["Options"]:
        """The rows with switch ``name`` changed alone: a boolean negated; a choice (DiT's sdpa=auto) at each boolean."""
        value = dict(self.switches)[name]
        others = [not value] if isinstance(value, bool) else [True, False]
        return [replace(self, switches=tuple((k, o if k == name else v) for k, v in self.switches)) for o in others]

    def label(self, default: "Options") -> str:
        """The defaults spelled out, or only what this row changes."""
        mine, theirs = self.settings(), default.settings()
        changed = [f"{k}={v}" for k, v in mine.items() if v != theirs[k]]
        return "default, " + ", ".join(changed) if changed else "default (" + (", ".join(k if v is True else f"{k}={v}" for k, v in mine.items() if v)
                                                                 or "all off") + ")"


def ddpm_impl(network: str, batch: int, device: str, options: Options = Options()):
    net = build_network(*NETWORKS[network], **dict(options.switches)).to(device)
    size, channels = net.image_size, net.in_channels
    ema = torch.optim.swa_utils.AveragedModel(net, use_buffers=True)
    process = DDPMProcess(linear_betas(T)).to(device)
    denoiser = Denoiser(net, process)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=options.fused)
    run = torch.compile(net) if options.compile_net else net
    x0 = torch.randn(batch, channels, size, size, device=device)
    labels = torch.randint(0, net.num_classes, (batch,), device=device)

    def train_step():
        with _autocast(device, options.bf16):
            loss = Denoising()(denoiser, x0, drop_labels(labels, P_UNCOND, net.null_label), net=run)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_step(ema, net, decay=0.9999)

    sampling = denoiser.with_net(run)

    def two_passes(x, t, y):  # guidance without batching: the conditional and unconditional halves one after the other
        (x0_c, eps_c), (x0_u, eps_u) = sampling(x, t, y), sampling(x, t, torch.full_like(y, net.null_label))
        return (1 + W) * x0_c - W * x0_u, (1 + W) * eps_c - W * eps_u

    def sample(n: int, steps: int = 50):
        noise = torch.randn(n, channels, size, size, device=device)
        model_fn = guided(sampling, labels[:n], W) if options.batched_guidance else partial(two_passes, y=labels[:n])
        with torch.no_grad(), _autocast(device, options.bf16):  # as ddpm.sample with sampler.precision=auto
            sample_ddim(model_fn, process, noise, steps=steps)

    return net, train_step, sample


def diffusers_impl(network: str, batch: int, device: str, bf16: bool, attention: str = "sdpa"):
    """diffusers' model of the same layout and weights (what ``ddpm.export`` writes), trained and sampled as
    diffusers' examples do; ``attention="plain"``: its attention written out (for counting FLOPs)."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.training_utils import EMAModel

    ours = build_network(*NETWORKS[network])
    _, model = to_diffusers_network(ours)
    model = model.train().to(device)
    if attention == "plain":  # every attention layer's processor (DiTTransformer2DModel has no set_attn_processor)
        for module in model.modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor"):
                module.set_processor(AttnProcessor())
    size, channels, null = ours.image_size, ours.in_channels, ours.null_label

    def forward(x, t, y):
        if type(model).__name__ == "UNet2DModel":
            return model(x, t, class_labels=y).sample
        return model(x, timestep=t, class_labels=y).sample

    ema = EMAModel(model.parameters(), decay=0.9999)
    train_scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=device.startswith("cuda"))
    x0 = torch.randn(batch, channels, size, size, device=device)
    labels = torch.randint(0, ours.num_classes, (batch,), device=device)
    alphas = train_scheduler.alphas_cumprod.to(device)

    def train_step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, T, (batch,), device=device)
        dropped = torch.where(torch.rand(batch, device=device) < P_UNCOND, null, labels)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPMScheduler.add_noise, without its per-call host copies
        with _autocast(device, bf16):
            loss = F.mse_loss(forward(x_t, t, dropped).float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(model.parameters())

    def sample(n: int, steps: int = 50):
        scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear")
        scheduler.set_timesteps(steps)
        x = torch.randn(n, channels, size, size, device=device)
        both = torch.cat([labels[:n], torch.full((n,), null, device=device)])
        with torch.no_grad(), _autocast(device, bf16):
            for t in scheduler.timesteps:
                eps_c, eps_u = forward(torch.cat([x, x]), t.expand(2 * n).to(device), both).float().chunk(2)
                x = scheduler.step(eps_u + (1 + W) * (eps_c - eps_u), t, x).prev_sample  # diffusers' s = 1 + w

    return model, train_step, sample


def _time(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _flops(train_step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step()
    return float(counter.get_total_flops())


def default_options(network: str, device: str) -> Options:
    """What ``python -m ddpm.train`` and ``ddpm.sample`` do with this network on this machine: its model file's speed
    switches (its class's ``speed_options``), conf/optim's fused AdamW, and trainer.precision=auto and
    sampler.precision=auto (bf16 where bf16 is native)."""
    cfg = compose(list(NETWORKS[network]))
    net_class = type(build_network(*NETWORKS[network], device="meta"))
    return Options(switches=tuple((name, cfg.model[name]) for name in net_class.speed_options),
                   compile_net=bool(cfg.model.get("compile", False)), fused=bool(cfg.optim.optimizer.fused),
                   bf16=native_bf16("gpu" if device.startswith("cuda") else "cpu"))


def variants(network: str, args) -> list[tuple[Options, bool]]:
    """(options, sample too?) per row: the default fast path, its float32 version, then each switch flipped alone."""
    default = default_options(network, args.device)
    rows = [(default, True)]
    if default.bf16:
        rows.append((replace(default, bf16=False), True))
    if args.compile:
        rows.append((replace(default, compile_net=True), True))
    if args.ablate:
        rows += [(options, True) for name, _ in default.switches for options in default.flipped(name)]
        rows += [(replace(default, fused=False), False),  # the optimizer: training only
                 (replace(default, batched_guidance=False), True)]
    return rows


def bench_network(network: str, args, roofs: dict) -> list[Row]:
    small = network in ("tiny", "dit")
    device, batch = args.device, args.batch or (128 if small or args.device.startswith("cuda") else 16)
    steps = args.steps or (20 if small else 5)
    default = default_options(network, device)
    theirs_net, d_train, d_sample = diffusers_impl(network, batch, device, bf16=args.diffusers_bf16)
    base = Row(network, "diffusers", "bf16 eager" if args.diffusers_bf16 else "fp32 eager", batch,
               sum(p.numel() for p in theirs_net.parameters()))
    # The network's FLOPs per step, the same for every row (the convention of model FLOPs utilisation): counted with
    # the attention written out on both sides, because torch.utils.flop_counter has no formula for PyTorch's CPU
    # flash-attention kernel and would leave the attention out (16 of 597 GFLOP for the CIFAR-10 U-Net at batch 16).
    plain = Options(switches=tuple((name, False) for name, _ in default.switches))
    model_flops = _flops(ddpm_impl(network, batch, device, plain)[1])
    base.flops_per_step = _flops(diffusers_impl(network, batch, device, bf16=False, attention="plain")[1])
    base.extra["flops_ratio_to_ddpm"] = base.flops_per_step / model_flops
    rows, diffusers_times, diffusers_sample = [], [], []
    for options, with_sampling in variants(network, args):
        net, o_train, o_sample = ddpm_impl(network, batch, device, options)
        row = Row(network, "ddpm", options.label(default), batch, sum(p.numel() for p in net.parameters()))
        row.extra["options"] = options.settings()
        for _ in range(args.warmup):
            o_train(), d_train()
        times, theirs = [], []
        for _ in range(steps):  # alternating: both see the same machine state
            times.append(_time(o_train, device))
            theirs.append(_time(d_train, device))
        row.train_ms = 1000 * statistics.median(times)
        # The median of paired ratios, each diffusers step against the ddpm step just before it: the machine drifts.
        row.ratio_train = statistics.median(d / o for d, o in zip(theirs, times))
        diffusers_times += theirs
        row.flops_per_step = model_flops
        if with_sampling:
            o_sample(2, steps=2)
            sample_times, theirs = [], []
            for _ in range(args.sample_repeats):
                sample_times.append(_time(lambda: o_sample(args.sample_batch), device))
                theirs.append(_time(lambda: d_sample(args.sample_batch), device))
            row.sample_img_s = args.sample_batch / statistics.median(sample_times)
            row.ratio_sample = statistics.median(d / o for d, o in zip(theirs, sample_times))
            diffusers_sample += theirs
        _peak_reset(device)
        o_train()
        row.peak_mb = _peak_mb(device)
        row.extra["roof"] = roofs["bf16" if options.bf16 else "fp32"]
        rows.append(row)
        del net, o_train, o_sample
    _peak_reset(device)
    d_train()
    base.peak_mb = _peak_mb(device)
    base.train_ms = 1000 * statistics.median(diffusers_times)
    base.sample_img_s = args.sample_batch / statistics.median(diffusers_sample)
    base.ratio_train = base.ratio_sample = 1.0
    base.extra["roof"] = roofs["bf16" if args.diffusers_bf16 else "fp32"]
    for row in [base, *rows]:
        row.train_img_s = batch / (row.train_ms / 1000)
        row.gflops_s = row.flops_per_step / (row.train_ms / 1000) / 1e9
        row.roof_fraction = row.gflops_s / row.extra["roof"]
        row.nfe_s = row.sample_img_s * 50 * 2  # network evaluations of one image: 50 steps x (conditional + unconditional)
    return [base, *rows]


def bench_data(device: str, batches: int = 200, batch: int = 128) -> list[dict]:
    """Batches per second of the digits training data reaching ``device``: through the DataLoader (collating 128
    dataset items, then a host-to-device copy) against ``data.on_device`` (one index gather on the device)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from ddpm.data import Digits
    from ddpm.training.data import DataModule

    rows = []
    for on_device in (False, True):
        data = DataModule(Digits(root=".", batch_size=batch, num_workers=0, image_size=8, channels=1, num_classes=10,
                                 on_device=on_device))
        data.setup()

        def draw():
            drawn = 0
            while drawn < batches:
                for item in data.train_dataloader():
                    item = move_data_to_device(item, device)  # as Lightning moves a batch (a dict of keys on device)
                    images, labels = data.on_after_batch_transfer(item, 0)
                    drawn += 1
                    if drawn == batches:
                        break
            _sync(device)

        draw()  # warm-up (and, with on_device, the one-time copy of the set)
        seconds = statistics.median(_time(draw, device) for _ in range(3))
        rows.append({"data.on_device": on_device, "batches_s": batches / seconds})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="tiny,dit,cifar10", help=f"of {sorted(NETWORKS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 128; 32x32 on CPU: 16)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per implementation and row (default: 20; 32x32: 5)")
    parser.add_argument("--sample-batch", type=int, default=8, help="images per guided DDIM-50 sample")
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="add a torch.compile row")
    parser.add_argument("--ablate", action="store_true",
                        help="also one row per switch flipped alone: the backbone's own, fused AdamW, batched guidance")
    parser.add_argument("--diffusers-bf16", action="store_true", help="the diffusers baseline in bf16 autocast (GPU target)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak (H200: 989) to report model FLOPs utilisation")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    roofs = {"fp32": matmul_roof(torch.float32, args.device), "bf16": matmul_roof(torch.bfloat16, args.device)}
    rows = [row for network in args.networks.split(",") for row in bench_network(network, args, roofs)]
    where = f"{args.device}, {torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"\n{where}; matmul roof fp32 {roofs['fp32']:.0f} GFLOP/s, bf16 {roofs['bf16']:.0f} GFLOP/s; torch {torch.__version__}")
    print("| network | impl | options | batch | params | train img/s | ratio | GFLOP/step | GFLOP/s | % roof | "
          "DDIM-50 guided img/s | NFE/s | ratio | peak MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.network} | {r.impl} | {r.options} | {r.batch} | {r.params:,} | {r.train_img_s:.1f} | {r.ratio_train:.2f} | "
              f"{r.flops_per_step / 1e9:.1f} | {r.gflops_s:.0f} | {100 * r.roof_fraction:.0f}% | {r.sample_img_s:.2f} | "
              f"{r.nfe_s:.1f} | {r.ratio_sample:.2f} | {r.peak_mb:.0f} |")
    data_rows = bench_data(args.device)
    print("\n| digits training batches (128) reaching the device | batches/s | ratio |\n|---|---:|---:|")
    for r in data_rows:
        print(f"| data.on_device={str(r['data.on_device']).lower()} | {r['batches_s']:.0f} | {r['batches_s'] / data_rows[0]['batches_s']:.2f} |")
    if args.peak_tflops:
        for r in rows:
            r.extra["mfu"] = r.gflops_s / (1000 * args.peak_tflops)
            print(f"MFU {r.network} {r.impl} {r.options}: {100 * r.extra['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s")
    with open(args.out, "w") as f:
        json.dump({"device": where, "roofs_gflops": roofs, "rows": [r.__dict__ for r in rows], "data": data_rows}, f, indent=2)


if __name__ == "__main__":
    main()
