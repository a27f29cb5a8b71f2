# `make install` sets up a fresh machine; `make test` runs the suite CI runs (everything but `slow`, `gpu` and `slurm`);
# `make test-slurm` the SLURM tests (.ci/run runs both).
PYTHON ?= python
PYTEST_WORKERS ?= 2

.PHONY: install install-cpu test test-slurm test-all train bench bench-samplers clean

install:
	$(PYTHON) -m pip install -e ".[dev]"

# A machine without a GPU: PyTorch's CPU wheels first (about 0.2 GB, where the default wheels bring 4 GB of CUDA
# libraries and triton), then the same install, which keeps them.
install-cpu:
	$(PYTHON) -m pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest -m "not slow and not gpu and not slurm" -n $(PYTEST_WORKERS) --dist loadgroup --timeout 600

# The SLURM tests, against a cluster started by `bash tests/slurm/cluster.sh up` (as root; .ci/run does it). Their jobs
# mostly wait on SLURM (time limits, requeues), so they run 3 at a time on the cluster's node.
test-slurm:
	$(PYTHON) -m pytest -m slurm tests/test_slurm.py -n 3 --timeout 900

test-all:
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS)

train:
	$(PYTHON) -m ddpm.train

# Training/sampling throughput against diffusers (installs the bench extra first).
bench:
	$(PYTHON) -m pip install -e ".[bench]"
	$(PYTHON) benchmarks/throughput.py

# Quality against NFE for one checkpoint: make bench-samplers CKPT=outputs/<date>/<time>/checkpoints/last.ckpt
bench-samplers:
	$(PYTHON) benchmarks/sampler_quality.py $(CKPT)

clean:
	rm -rf outputs multirun .pytest_cache
