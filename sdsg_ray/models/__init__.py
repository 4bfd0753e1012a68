"""StyleGAN2 generator, discriminator and encoder (no Ray)."""

from sdsg_ray.models.networks import (
    Discriminator,
    Encoder,
    Generator,
    MappingNetwork,
    Reconstruction,
    SynthesisNetwork,
    build_discriminator,
    build_encoder,
    build_generator,
    build_networks,
    reconstruct,
    truncate,
)

__all__ = [
    "Discriminator",
    "Encoder",
    "Generator",
    "MappingNetwork",
    "Reconstruction",
    "SynthesisNetwork",
    "build_discriminator",
    "build_encoder",
    "build_generator",
    "build_networks",
    "reconstruct",
    "truncate",
]
