"""ddpm: denoising diffusion probabilistic models as Hydra-composed Lightning experiments.

From Python, a trained model is ``ddpm.load(path)`` (``ddpm.inference``): no Lightning, Hydra or wandb is imported.
"""

__version__ = "0.1.0"
__all__ = ["Guidance", "Model", "load"]


def __getattr__(name: str):
    # Imported on first use, so ``import ddpm.train`` does not pay for it and ``import ddpm`` stays light.
    if name in __all__:
        from ddpm import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
