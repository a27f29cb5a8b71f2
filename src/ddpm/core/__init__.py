"""The diffusion math in pure PyTorch: schedules, the forward process and its loss, prediction targets and loss
weightings, the denoiser, guidance, samplers and the networks. Nothing here imports Lightning, Hydra, omegaconf or
wandb (tests/test_axes.py checks it); the entry points build these objects from config and hand them over."""
