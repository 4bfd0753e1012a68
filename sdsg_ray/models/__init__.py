"""StyleGAN2 generator, discriminator and encoder (no Ray)."""

from sdsg_ray.models.networks import (
    Discriminator,
    Encoder,
    Generator,
    MappingNetwork,
    SynthesisNetwork,
    build_generator,
    build_networks,
)

__all__ = [
    "Discriminator",
    "Encoder",
    "Generator",
    "MappingNetwork",
    "SynthesisNetwork",
    "build_generator",
    "build_networks",
]
