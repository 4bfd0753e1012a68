"""Multi-modal truncation without Ray: fitting, LPIPS assignment, the three modes, reproducibility.

The generator has random weights (honest for plumbing, determinism and the truncation maths); the
perceptual assignment uses the real shipped metric (stlpips-alex), since its correctness is the point.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdsg_ray.artifacts.checkpoint import export_inference, load_inference
from sdsg_ray.config import ModelConfig
from sdsg_ray.models.networks import build_generator
from sdsg_ray.storage import get_storage
from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.truncation.modes import SampleSpec
from sdsg_ray.truncation.sampler import Sampler
from sdsg_ray.truncation.assign import PassRows, render

METRIC = "stlpips-alex"
N_CLUSTERS = 6


def make_tiny_checkpoint(root: Path) -> str:
    """A random-weight 32 px G exported as inference.pt (w_avg the mean mapped w, as training would set it)."""
    torch.manual_seed(0)
    model = ModelConfig(resolution=32)
    G = build_generator(model).eval()
    with torch.no_grad():
        G.mapping.w_avg.copy_(G.mapping(torch.randn(2000, model.z_dim)).mean(0))
    ckpt = str(root / "ckpt")
    export_inference(G, None, model, {"stage": "test"}, ckpt, get_storage())
    return ckpt


def make_tiny_model(root: Path, clusters: int = N_CLUSTERS, n_latents: int = 600) -> tuple[str, str]:
    """:func:`make_tiny_checkpoint` and its clusters fitted via `sdsg cluster` (with the learned-assignment
    classifier, fitted on the n_latents mapped w). Returns (checkpoint URI, clusters URI)."""
    from jobs.cli import main

    ckpt = make_tiny_checkpoint(root)
    out = str(root / "clusters")
    argv = ["cluster", "--checkpoint", ckpt, "--out", out, "--n-latents", str(n_latents),
            "--clusters", str(clusters), "--seed", "3", "--set", f"cluster.metric={METRIC}",
            # the learned assignment, kept small: every latent labelled, a fifth held out, a short fit
            "--set", "cluster.classifier_hidden=64", "--set", "cluster.classifier_steps=60"]
    assert main(argv) == 0
    return ckpt, out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def metric():
    from sdsg_ray.pretrained import build_metric

    return build_metric(METRIC)


@pytest.fixture(scope="module")
def sampler(tiny, metric) -> Sampler:
    ckpt, clusters = tiny
    # batch_size 8: the largest forward pass; small keeps the CPU test cheap
    cluster_set = ClusterFile(clusters).read(get_storage())
    return Sampler(load_inference(ckpt), cluster_set, metric, assign_by="lpips", batch_size=8)


def test_clusters_file_records_its_origin_and_is_reproducible(tiny):
    ckpt, out = tiny
    clusters = ClusterFile(out).read(get_storage())
    bundle = load_inference(ckpt)
    assert clusters.centers.shape == (N_CLUSTERS, bundle.G_ema.w_dim)
    assert clusters.sizes.sum() == 600 and (clusters.sizes > 0).all()
    assert clusters.checkpoint == bundle.identity
    assert clusters.metric == METRIC and clusters.seed == 3
    assert clusters.config["clusters"] == N_CLUSTERS and len(clusters.identity) == 16
    # weights_only loading: plain tensors and data, no pickled code
    torch.load(Path(out) / "clusters.pt", weights_only=True)
    # centers are means of mapped w, so they live where the w do (near w_avg, not at the origin)
    w = Sampler(bundle).latents(range(200))
    assert torch.cdist(clusters.centers, w).min(dim=1).values.max() < torch.cdist(w, w).max()
    # same seed -> same centers
    from sdsg_ray.truncation.clusters import fit_centers, map_latents

    again = fit_centers(map_latents(bundle.G_ema.mapping, bundle.G_ema.z_dim, 600, 3), N_CLUSTERS, 3)[0]
    assert torch.equal(again, clusters.centers)


def test_lpips_assignment_equals_brute_force(sampler, metric):
    w = sampler.latents(range(8))
    images = render(sampler.G.synthesis, w)
    cached = sampler.assigner.distances(images)
    centers = sampler.assigner.center_images
    with torch.no_grad():  # the plain way: one LPIPS call per (sample, center) pair
        brute = torch.stack([metric(images, centers[k:k + 1].expand_as(images)) for k in range(len(centers))], 1)
    torch.testing.assert_close(cached, brute, rtol=1e-4, atol=1e-4)
    assert torch.equal(sampler.assigner.assign(w), brute.argmin(dim=1))
    # the perceptual choice is not just the Euclidean one in disguise for every sample (or the test is void)
    assert len(set(cached.argmin(dim=1).tolist())) > 1


def test_modes(sampler):
    seeds = [0, 1, 2, 3]
    none = sampler.sample(seeds, 0.5, "none")
    mean = sampler.sample(seeds, 0.5, "mean")
    multi = sampler.sample(seeds, 0.5, "multimodal")
    assert not np.array_equal(none, mean) and not np.array_equal(mean, multi)
    # psi = 1 is no truncation whatever the target
    at_one = [sampler.sample(seeds, 1.0, mode) for mode in ("none", "mean", "multimodal")]
    assert np.array_equal(at_one[0], at_one[1]) and np.array_equal(at_one[0], at_one[2])
    # psi = 0 lands exactly on the target: the assigned (or forced) center's image, or G(w_avg)
    centers = sampler.center_images()
    assigned = sampler.assigner.assign(sampler.latents(seeds)).tolist()
    assert np.array_equal(sampler.sample(seeds, 0.0, "multimodal"), centers[assigned])
    assert np.array_equal(sampler.sample(seeds, 0.0, "multimodal", cluster=2), centers[[2] * 4])
    mean_image = sampler.sample(seeds, 0.0, "mean")
    assert (mean_image == mean_image[:1]).all()


def test_same_seed_same_image_whatever_the_batch(sampler):
    seeds = [7, 11, 2**32 - 1]
    mixed = [SampleSpec(7, 0.3, "multimodal"), SampleSpec(11, 0.6, "mean"), SampleSpec(2**32 - 1, 1.0, "none")]
    batch = sampler.render_specs(mixed)
    singles = np.concatenate([sampler.render_specs([s]) for s in mixed])
    assert np.array_equal(batch, singles)
    assert np.array_equal(batch, sampler.render_specs(mixed))
    big = sampler.sample(list(range(40)) + seeds, 0.3, "multimodal")  # spans two internal chunks
    assert np.array_equal(big[40], singles[0])
    # a full pass (8 rows) against the short passes the three shared and each had alone
    full = sampler.render_specs(mixed + [SampleSpec(s, 0.5, "mean") for s in range(5)])
    assert np.array_equal(full[:3], singles)


def test_coarse_lpips_assignment_equals_brute_force_at_that_resolution(sampler, metric):
    coarse = Sampler(sampler.bundle, sampler.clusters, metric, "lpips", batch_size=8, assign_resolution=16)
    w = sampler.latents(range(8))
    images = render(sampler.G.synthesis, w, resolution=16)
    centers = render(sampler.G.synthesis, sampler.centers, resolution=16)
    assert images.shape[-1] == 16 and coarse.assigner.center_images.shape[-1] == 32  # grids stay full size
    with torch.no_grad():
        brute = torch.stack([metric(images, centers[k:k + 1].expand_as(images)) for k in range(len(centers))], 1)
    torch.testing.assert_close(coarse.assigner.distances(images), brute, rtol=1e-4, atol=1e-4)
    assert torch.equal(coarse.assigner.assign(w), brute.argmin(dim=1))
    for bad in (12, 64):  # not a block of this 32 px generator: the error names the setting
        with pytest.raises(ValueError, match=rf"assign_resolution must be one of .*\[4, 8, 16, 32\], got {bad}"):
            Sampler(sampler.bundle, sampler.clusters, metric, batch_size=8, assign_resolution=bad)


def test_pass_rows_keep_only_sizes_that_give_the_full_pass_bits():
    probe = torch.randn(8, 5)
    rows = PassRows.powers_of_two(8)
    assert rows.sizes == (1, 2, 4, 8) and PassRows.powers_of_two(6).sizes == (1, 2, 4, 6)
    assert rows.verified(lambda x: x * 2, probe).sizes == (1, 2, 4, 8)
    # a kernel that rounds differently below 4 rows (as BLAS does for tiny batches on some CPUs)
    assert rows.verified(lambda x: x * 2 + (1e-6 if len(x) < 4 else 0.0), probe).sizes == (4, 8)
    # ... or only for rows past the first in a short pass: the row position is checked too
    later_rows = lambda x: x * 2 + 1e-6 * (torch.arange(len(x))[:, None] >= 1) * (len(x) < 8)  # noqa: E731
    assert rows.verified(later_rows, probe).sizes == (1, 8)
    # run: chunks of at most 8 rows, each padded up to an allowed size, padding dropped
    seen: list[int] = []
    out = PassRows([4, 8]).run(lambda x: seen.append(len(x)) or x * 2, torch.arange(11.0)[:, None])
    assert seen == [8, 4] and torch.equal(out, torch.arange(11.0)[:, None] * 2)


@pytest.mark.parametrize("spec, field", [
    (SampleSpec(-1), "seed"), (SampleSpec(2**32), "seed"), (SampleSpec(0, psi=1.5, mode="mean"), "psi"),
    (SampleSpec(0, mode="clamp"), "truncation"), (SampleSpec(0, mode="multimodal", cluster=N_CLUSTERS), "cluster"),
    (SampleSpec(0, mode="mean", cluster=0), "cluster"),
])
def test_bad_specs_name_the_field(sampler, spec, field):
    with pytest.raises(ValueError, match=field):
        sampler.render_specs([spec])


def test_center_grid_and_mismatched_clusters(sampler, tiny):
    grid = Image.open(io.BytesIO(sampler.center_grid()))
    assert grid.size[0] >= 3 * 32 and grid.mode == "RGB"
    clusters = ClusterFile(tiny[1]).read(get_storage())
    clusters.checkpoint = "0" * 16
    with pytest.raises(ValueError, match="sdsg cluster"):
        Sampler(sampler.bundle, clusters, None, assign_by="w")


# ---------------------------------------------------------------------------------------------------------
# Learned assignment (the classifier `sdsg cluster` fits to the LPIPS rule)


def test_classifier_is_saved_with_the_centers_and_loads_weights_only(tiny, tmp_path):
    from sdsg_ray.artifacts.clusters import ClusterFile, ClusterSet
    from sdsg_ray.truncation.learned import CenterClassifier

    ckpt, out = tiny
    payload = torch.load(Path(out) / "clusters.pt", weights_only=True)  # no pickled code, tensors only
    classifier = CenterClassifier.from_state(payload["classifier"])
    assert classifier.num_classes == N_CLUSTERS
    clusters = ClusterFile(out).read(get_storage())
    w = Sampler(load_inference(ckpt)).latents(range(16))
    assert torch.equal(CenterClassifier.from_state(clusters.classifier).logits(w), classifier.logits(w))
    quality = clusters.assignment_quality
    assert quality["held_out"] == 120 and quality["fitted_on"] == 480
    for key in ("learned_top1", "learned_top3", "w_top1", "majority_top1", "coarse_16px_top1"):
        assert 0.0 <= quality[key] <= 1.0, (key, quality)
    assert quality["learned_top3"] >= quality["learned_top1"]
    assert quality["learned_regret"] >= 0 and quality["w_regret"] >= 0
    # the classifier learned something about the LPIPS rule: better than always naming the commonest center
    assert quality["learned_top1"] > quality["majority_top1"], quality
    # a clusters file without a classifier (older files, classifier_latents=0) still loads, and means lpips
    bare = ClusterSet(clusters.centers, clusters.sizes, clusters.seed, clusters.metric, clusters.checkpoint)
    loaded = ClusterFile(ClusterFile(str(tmp_path / "bare")).write(bare, get_storage())).read(get_storage())
    assert loaded.classifier is None and loaded.assignment_quality == {}
    assert "classifier" not in torch.load(tmp_path / "bare" / "clusters.pt", weights_only=True)


def test_assignment_modes(tiny, metric):
    ckpt, out = tiny
    bundle, clusters = load_inference(ckpt), ClusterFile(out).read(get_storage())
    learned = Sampler(bundle, clusters, metric, batch_size=8)  # auto: the file has a classifier
    assert learned.assign_by == "learned" and learned.assignments == ("lpips", "learned", "w")
    assert Sampler(bundle, clusters, None, assign_by="w", batch_size=8).assignments == (
        "learned", "w")
    seeds = list(range(8))
    w = learned.latents(seeds)
    from sdsg_ray.truncation.learned import CenterClassifier

    expected = CenterClassifier.from_state(clusters.classifier).logits(w).argmax(1)
    assert torch.equal(learned.assigner.assign(w), expected)
    # psi = 0 lands on each rule's center; a per-sample rule overrides the sampler's default
    centers = learned.center_images()
    images = render(learned.G.synthesis, w)
    with torch.no_grad():  # the paper's rule, brute force: one LPIPS call per (sample, center) pair
        brute = torch.stack([metric(images, learned.assigners["lpips"].center_images[k:k + 1].expand_as(images))
                             for k in range(N_CLUSTERS)], 1).argmin(1)
    by_w = torch.cdist(w, learned.centers).argmin(1)
    for by, chosen in (("learned", expected), ("lpips", brute), ("w", by_w)):
        drawn = learned.render_specs([SampleSpec(s, 0.0, "multimodal", assignment=by) for s in seeds])
        assert np.array_equal(drawn, centers[chosen.tolist()]), by
    assert np.array_equal(learned.sample(seeds, 0.0, "multimodal"), centers[expected.tolist()])
    # mixed rules in one batch give each sample what it gets alone
    mixed = [SampleSpec(s, 0.4, "multimodal", assignment=by) for s, by in zip(seeds, ["lpips", "learned", "w"] * 3)]
    assert np.array_equal(learned.render_specs(mixed), np.concatenate([learned.render_specs([m]) for m in mixed]))
    for bad in (SampleSpec(0, 0.5, "multimodal", assignment="nearest"), SampleSpec(0, 0.5, "mean", assignment="w"),
                SampleSpec(0, 0.5, "multimodal", cluster=1, assignment="w")):
        with pytest.raises(ValueError, match="assignment"):
            learned.render_specs([bad])
    with pytest.raises(ValueError, match="assignment.*not available"):  # no metric: no lpips rule here
        Sampler(bundle, clusters, None, assign_by="w", batch_size=8).render_specs(
            [SampleSpec(0, 0.5, "multimodal", assignment="lpips")])


def test_soft_targets_teach_a_tie_that_hard_labels_turn_into_a_coin_flip():
    """fit_classifier(temperature > 0) distils all K distances: for latents whose two nearest centers are
    tied, the fitted logits give both about equal weight; with hard labels (temperature 0) they do not."""
    from sdsg_ray.truncation.learned import fit_classifier

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2000, 4, generator=gen)
    # centers 0 and 1 always tied (distance 0.1), center 2 far (0.5): the argmin is always 0 (first of a tie)
    distances = torch.tensor([0.1, 0.1, 0.5]).repeat(len(w), 1)
    hard = fit_classifier(w, distances, hidden=16, steps=100, seed=0, temperature=0.0)
    soft = fit_classifier(w, distances, hidden=16, steps=100, seed=0, temperature=0.05)
    p_hard = torch.softmax(hard.logits(w), 1).mean(0)
    p_soft = torch.softmax(soft.logits(w), 1).mean(0)
    assert p_hard[0] > 0.9 and p_hard[1] < 0.1  # the tie became a certainty
    assert abs(float(p_soft[0] - p_soft[1])) < 0.05 and p_soft[2] < 0.05  # the tie is kept, the far center dropped
