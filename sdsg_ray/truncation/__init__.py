"""Truncation: the registered modes (modes), KMeans centers of W (clusters), nearest-center assignment
(assign, learned) and the Sampler (no Ray). Import the submodules: this package imports nothing, so the
torch-free registry in ``modes`` stays light for config.py."""
