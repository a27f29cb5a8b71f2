"""ddpm: denoising diffusion probabilistic models as Hydra-composed Lightning experiments.

From Python, a trained model is ``ddpm.load(path)`` (``ddpm.inference``): no Lightning, Hydra or wandb is imported.
"""

__version__ = "0.1.0"
__all__ = ["Guidance", "Pipeline", "load"]


def __getattr__(name: str):
    # Imported on first use, so ``import ddpm.train`` does not pay for it and ``import ddpm`` stays light.
    if name in __all__:
        from ddpm import inference

        return getattr(inference, name)
    if name == "Model":  # its name until issue 30: `model=` is the network's group, so the trained model is a Pipeline
        raise AttributeError("ddpm.Model is now ddpm.Pipeline (what ddpm.load returns: a denoiser over chosen weights, "
                             "with its sampler and guidance); the `model=` config group is the network")
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
