"""Self-Distilled StyleGAN (Mokady et al., 2022) on Ray."""

__version__ = "0.1.0"
