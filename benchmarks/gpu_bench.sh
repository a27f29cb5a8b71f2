#!/usr/bin/env bash
# Issue 5's GPU check, prepared for the lent H200 (not run yet: no GPU was lent to the sessions so far).
# The device has torch, lightning, torchvision, einops, torchmetrics but no network: first, here,
#   pip download -d .whl hydra-core omegaconf antlr4-python3-runtime==4.9.3 diffusers
# then run this script there with .whl carried. Budget: about 5 minutes (compile included).
set -euo pipefail
python -m pip install -q --no-index --find-links .whl hydra-core omegaconf diffusers
python -m pip install -q --no-deps --no-build-isolation -e .
OUT=${OUT:-.}
# unet_cifar10 at batch 128: ddpm's default (bf16 on an H200), its fp32 version and bf16 + compile, against diffusers
# eager bf16; MFU vs 989 TFLOP/s. Training is the target; ddpm samples in float32 (as ddpm.sample does) while
# diffusers samples in bf16 here, so the sampling ratio understates ddpm.
timeout 280 python benchmarks/throughput.py --device cuda --networks cifar10 --batch 128 --compile --diffusers-bf16 \
    --sample-batch 64 --steps 20 --warmup 5 --peak-tflops 989 --out "$OUT/bench_gpu.json" | tee "$OUT/bench_gpu.md"
