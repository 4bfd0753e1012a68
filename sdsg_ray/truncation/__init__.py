"""Multi-modal truncation: KMeans centers of W, nearest-center assignment, and the Sampler (no Ray)."""

from sdsg_ray.truncation.clusters import ClusterSet, load_clusters, run_clustering, save_clusters
from sdsg_ray.truncation.sampler import MODES, SEED_MAX, SampleSpec, Sampler, load_sampler

__all__ = ["ClusterSet", "load_clusters", "run_clustering", "save_clusters", "MODES", "SEED_MAX", "SampleSpec",
           "Sampler", "load_sampler"]
