"""A truncation mode registered from this file alone works end to end: drawn by the Sampler (checked against
the formula), served over real HTTP (in the Serve replicas' own processes, through Ray's public
``worker_process_setup_hook``), accepted by ``sdsg generate``'s config, and drawn in Fig. 7 with its legend."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from conftest import driver_with_setup_hook, free_port
from test_serve import assert_names_field, serve_config
from test_truncation import make_tiny_checkpoint

from sdsg_ray import figures
from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.config import GenerateConfig
from sdsg_ray.evaluation.truncation_curves import truncation_curve
from sdsg_ray.imaging import to_uint8
from sdsg_ray.truncation.assign import render
from sdsg_ray.truncation.modes import TRUNCATION_MODES, Curve, SampleSpec, TruncationMode
from sdsg_ray.truncation.sampler import Sampler

TOY = "origin"
BATCH = 8  # the service's max_batch_size: images are reproducible for a given forward batch size


class OriginTruncation(TruncationMode):
    """Toward w = 0: w_t = psi * w."""

    name, label = TOY, "w = 0 (a test's toy)"
    curves = (Curve(TOY, "toy: toward the origin", "x-."),)

    def targets(self, sampler, specs, w):
        return torch.zeros_like(w), None


def register_toy() -> None:
    """Idempotent: the test process and every Serve replica's worker process (its setup hook) call it."""
    if TOY not in TRUNCATION_MODES:
        TRUNCATION_MODES.register(TOY, OriginTruncation())


@pytest.fixture(scope="module")
def toy():
    register_toy()
    yield TRUNCATION_MODES[TOY]
    TRUNCATION_MODES.unregister(TOY)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("toy-mode"))


@pytest.fixture(scope="module")
def sampler(ckpt, toy) -> Sampler:
    return Sampler(load_inference(ckpt), batch_size=BATCH)  # no clusters: the toy needs none


def test_the_sampler_draws_the_toy_by_its_formula(sampler):
    seeds, psis = [3, 4, 5], [0.0, 0.4, 1.0]
    specs = [SampleSpec(s, p, TOY) for s, p in zip(seeds, psis)]
    w = sampler.latents(seeds)
    w_t, centers = sampler.truncated_latents(specs, w)
    assert torch.equal(w_t, torch.tensor(psis)[:, None] * w)  # psi * w + (1 - psi) * 0
    assert centers.tolist() == [-1, -1, -1]  # no cluster centers
    images = sampler.render_specs(specs)
    assert np.array_equal(images[0], sampler.render_specs([SampleSpec(0, 0.0, TOY)])[0])  # psi 0: G(0), any seed
    assert np.array_equal(images[2], sampler.sample([5], 1.0, "none")[0])  # psi 1: w itself
    assert np.array_equal(images, to_uint8(render(sampler.G.synthesis, w_t, sampler.rows).cpu()))  # G(psi * w)
    # the toy takes no cluster, like every mode without centers
    with pytest.raises(ValueError, match="cluster"):
        sampler.render_specs([SampleSpec(1, 0.5, TOY, cluster=0)])
    # sdsg generate's config accepts it while it is registered, and names the choices for a bad one
    assert GenerateConfig(truncation=TOY).truncation == TOY
    with pytest.raises(ValueError, match=f"choose one of: none, mean, multimodal, {TOY}"):
        GenerateConfig(truncation="sideways")


def test_fig7_draws_the_toy_curve_with_its_legend(sampler, monkeypatch):
    """truncation_curve iterates the registry (the toy's line beside mean; no clusters, no multimodal) and the
    figure draws each line with its registered legend."""
    from matplotlib.axes import Axes

    class Bank:  # features: each image's mean colour
        def images(self, images):
            return images.reshape(len(images), -1, 3).mean(1).astype(np.float64)

    reference = np.random.default_rng(0).random((8, 3)) * 255
    curve = truncation_curve(sampler, Bank(), reference, list(range(6)), [0.0, 1.0])
    assert list(curve) == ["psis", "mean", TOY] and len(curve[TOY]["fd"]) == 2
    assert curve[TOY]["fd"][1] == curve["mean"]["fd"][1]  # psi 1 is one point for every mode
    assert curve[TOY]["fd"][0] != curve["mean"]["fd"][0]  # psi 0: G(0) for all, against G(w_avg) for all
    legends = []
    original = Axes.legend
    monkeypatch.setattr(Axes, "legend", lambda ax, *a, **k: legends.append(ax.get_legend_handles_labels()[1])
                        or original(ax, *a, **k))
    png = figures.distance_vs_psi(curve, "FD (colour)")
    assert png.startswith(b"\x89PNG") and legends == [["mean truncation", "toy: toward the origin"]]


@pytest.fixture(scope="module")
def app(ray_cluster, ckpt, toy):
    """The service, deployed from a driver whose job registers the toy in every worker process it starts
    (Ray's job-level ``worker_process_setup_hook``): the ingress validates requests, the sampler draws them."""
    from ray import serve

    from serve_app.app import start_app

    with driver_with_setup_hook(ray_cluster, register_toy):
        serve.shutdown()  # a controller another test module started would start its replicas without the hook
        try:
            yield start_app(serve_config(ckpt, "", free_port(), max_batch_size=BATCH))
        finally:
            serve.shutdown()  # give the cluster's resources back to the other test modules


def test_the_toy_over_http(app, sampler):
    with httpx.Client(base_url=app, timeout=60) as client:
        model = client.get("/v1/model").json()
        listed = {t["name"]: t for t in model["truncations"]}
        assert listed[TOY] == {"name": TOY, "label": OriginTruncation.label, "available": True, "clusters": False}
        assert listed["multimodal"]["available"] is False  # this model has no clusters
        seeds = [3, 4, 5]
        body = {"seeds": seeds, "psi": 0.4, "truncation": TOY, "format": "npy"}
        answer = client.post("/v1/samples", json=body)
        assert answer.status_code == 200, answer.text
        served = np.load(io.BytesIO(answer.content), allow_pickle=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the replica draws (serve num_cpus 1): CPU kernels may round by thread count
        try:
            expected = sampler.sample(seeds, 0.4, TOY)
        finally:
            torch.set_num_threads(threads)
        assert np.array_equal(served, expected)
        listed_png = client.post("/v1/samples", json={**body, "format": "png"}).json()
        assert listed_png["clusters"] == [None] * 3  # the toy goes toward no cluster center
        one = client.get("/v1/sample", params={"seed": 4, "psi": 0.4, "truncation": TOY, "format": "npy"})
        assert np.array_equal(np.load(io.BytesIO(one.content), allow_pickle=False), expected[1])
        # a mode nobody registered: a 4xx naming the field and every registered choice, the toy included
        for bad in (client.get("/v1/sample", params={"seed": 1, "truncation": "sideways"}),
                    client.post("/v1/samples", json={"seeds": [1], "truncation": "sideways"})):
            assert_names_field(bad, "truncation")
            assert f"choose one of: none, mean, multimodal, {TOY}" in bad.json()["detail"]
