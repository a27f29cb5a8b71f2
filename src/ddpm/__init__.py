"""ddpm: denoising diffusion probabilistic models as Hydra-composed Lightning experiments."""

__version__ = "0.1.0"
