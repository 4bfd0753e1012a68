"""The Serve sampler over real HTTP on the shared local Ray cluster: determinism, modes, batching,
input validation (4xx naming the field), a bounded load test and real autoscaling on logical GPUs."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import free_port
from PIL import Image
from test_truncation import METRIC, make_tiny_model

from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.config import load_config
from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.storage import get_storage
from sdsg_ray.truncation.modes import SampleSpec
from sdsg_ray.truncation.sampler import Sampler

LOAD_S = 8.0


def serve_config(ckpt: str, clusters: str, port: int, **serve_fields):
    fields = {
        "checkpoint": ckpt, "clusters": clusters, "port": port, "num_cpus": 1, "num_gpus": 0,
        "min_replicas": 1, "max_replicas": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.02,
        "max_ongoing_requests": 32, "max_samples_per_request": 16, "default_psi": 0.7,
    }
    fields.update(serve_fields)
    return load_config(None, {f"serve.{k}": v for k, v in fields.items()})


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from ray import serve

    from serve_app.app import start_app

    ckpt, clusters = make_tiny_model(tmp_path_factory.mktemp("serve"))
    port = free_port()
    base = start_app(serve_config(ckpt, clusters, port))
    yield {"base": base, "ckpt": ckpt, "clusters": clusters, "port": port}
    serve.shutdown()  # give the cluster's resources back to the other test modules


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app["base"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local_sampler(app) -> Sampler:
    from sdsg_ray.pretrained import build_metric

    # batch_size as in the service: images are reproducible for a given forward batch size
    clusters = ClusterFile(app["clusters"]).read(get_storage())
    return Sampler(load_inference(app["ckpt"]), clusters, build_metric(METRIC), batch_size=8)


def npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def test_info_endpoints(client, app):
    assert client.get("/healthz").json() == {"status": "ok"}
    model = client.get("/v1/model").json()
    bundle = load_inference(app["ckpt"])
    assert model["resolution"] == 32 and model["w_dim"] == bundle.G_ema.w_dim
    assert model["checkpoint"]["identity"] == bundle.identity and model["metric"] == METRIC
    assert model["pass_sizes"][-1] == 8 and model["pass_sizes"] == sorted(model["pass_sizes"])  # max_batch_size 8
    clusters = client.get("/v1/clusters").json()
    assert clusters["count"] == 6 and sum(clusters["sizes"]) == 600
    written = ClusterFile(app["clusters"]).read(get_storage())
    assert clusters["identity"] == model["clusters"]["identity"] == written.identity
    grid = client.get("/v1/clusters/grid.png")
    assert grid.headers["content-type"] == "image/png" and Image.open(io.BytesIO(grid.content)).size[0] >= 96
    assert "/v1/samples" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_determinism_and_modes_over_http(client, local_sampler):
    params = {"seed": 42, "psi": 0.5, "truncation": "multimodal", "format": "npy"}
    first = npy(client.get("/v1/sample", params=params))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, npy(client.get("/v1/sample", params=params)))
    # the service draws exactly what the library draws
    assert np.array_equal(first, local_sampler.sample([42], 0.5, "multimodal")[0])
    png = client.get("/v1/sample", params={**params, "format": "png"})
    assert png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), first)

    def image(psi, mode, **extra):
        return npy(client.get("/v1/sample", params={"seed": 3, "psi": psi, "truncation": mode, "format": "npy",
                                                    **extra}))

    assert not np.array_equal(image(0.5, "none"), image(0.5, "mean"))
    assert np.array_equal(image(1.0, "none"), image(1.0, "mean"))
    assert np.array_equal(image(1.0, "none"), image(1.0, "multimodal"))
    centers = local_sampler.center_images()
    assert np.array_equal(image(0.0, "multimodal", cluster=4), centers[4])
    nearest = int(local_sampler.assigner.assign(local_sampler.latents([3]))[0])
    assert np.array_equal(image(0.0, "multimodal"), centers[nearest])


def test_batched_equals_unbatched(client, app):
    seeds = list(range(100, 112))
    body = {"seeds": seeds, "psi": 0.6, "truncation": "multimodal", "format": "npy"}
    together = npy(client.post("/v1/samples", json=body))
    assert together.shape == (12, 32, 32, 3)

    async def concurrent() -> list[np.ndarray]:
        async with httpx.AsyncClient(base_url=app["base"], timeout=60) as c:
            rs = await asyncio.gather(*(c.get("/v1/sample", params={"seed": s, "psi": 0.6, "format": "npy"})
                                        for s in seeds))
        return [npy(r) for r in rs]

    assert np.array_equal(np.stack(asyncio.run(concurrent())), together)
    single = npy(client.get("/v1/sample", params={"seed": seeds[5], "psi": 0.6, "format": "npy"}))
    assert np.array_equal(single, together[5])
    listed = client.post("/v1/samples", json={**body, "format": "png"}).json()
    assert listed["seeds"] == seeds and len(listed["images"]) == 12
    assert len(listed["clusters"]) == 12 and all(isinstance(k, int) for k in listed["clusters"])  # multimodal
    mean = client.post("/v1/samples", json={**body, "truncation": "mean", "format": "png"}).json()
    assert mean["clusters"] == [None] * 12  # mean truncation goes toward no center
    counted = npy(client.post("/v1/samples", json={"count": 12, "seed": 100, "psi": 0.6, "format": "npy"}))
    assert np.array_equal(counted, together)
    grid = client.post("/v1/samples", json={**body, "format": "grid"})
    assert Image.open(io.BytesIO(grid.content)).size == (4 * 32, 3 * 32)


def _rule_choices(local_sampler, seeds: list[int]) -> dict[str, "torch.Tensor"]:
    """The center each rule picks for each seed: lpips by brute force (the paper's rule: one LPIPS call per
    (sample, center) pair), learned by the classifier, w by Euclidean distance in W."""
    import torch

    from sdsg_ray.truncation.assign import render

    w = local_sampler.latents(seeds)
    images = render(local_sampler.G.synthesis, w)
    lpips_assigner = local_sampler.assigners["lpips"]
    with torch.no_grad():
        brute = torch.stack([lpips_assigner.metric(images, lpips_assigner.center_images[k:k + 1].expand_as(images))
                             for k in range(len(lpips_assigner.center_images))], 1)
    return {"lpips": brute.argmin(1), "learned": local_sampler.assigners["learned"].assign(w),
            "w": torch.cdist(w, local_sampler.centers).argmin(1)}


def _seeds_where_rules_disagree(local_sampler, candidates: int = 64, keep: int = 4) -> list[int]:
    """A few seeds on which every pair of rules picks different centers on at least one seed (seeds where
    all three differ first): a server that answered one rule with another would serve other images."""
    chosen = _rule_choices(local_sampler, list(range(candidates)))
    lp, le, w = (chosen[by].tolist() for by in ("lpips", "learned", "w"))
    differ = {s: {pair for pair, (a, b) in {("lpips", "learned"): (lp[s], le[s]), ("lpips", "w"): (lp[s], w[s]),
                                            ("learned", "w"): (le[s], w[s])}.items() if a != b}
              for s in range(candidates)}
    seeds, covered = [], set()
    for s in sorted(differ, key=lambda s: -len(differ[s])):
        if len(seeds) < keep and (differ[s] - covered or len(differ[s]) == 3):
            seeds.append(s)
            covered |= differ[s]
    return seeds


def test_assignment_modes_over_http(client, app, local_sampler):
    """The clusters carry a classifier, so the default is learned; a request may pick lpips (the paper's rule)
    or w, and each lands (psi = 0) on the center the library's rule picks, lpips equal to brute force. The
    seeds are ones on which the three rules disagree (asserted first), so each answer tells the rules apart."""
    import torch

    model = client.get("/v1/model").json()
    assert model["assign_by"] == "learned" and model["assignments"] == ["lpips", "learned", "w"]
    quality = model["assignment_quality"]
    assert 0 <= quality["learned_top1"] <= quality["learned_top3"] <= 1 and "w_regret" in quality
    seeds = _seeds_where_rules_disagree(local_sampler)
    chosen = _rule_choices(local_sampler, seeds)
    for a, b in (("lpips", "learned"), ("lpips", "w"), ("learned", "w")):
        assert not torch.equal(chosen[a], chosen[b]), (a, b, seeds, chosen)  # the rules are told apart here
    print(f"assignment seeds {seeds}: " + ", ".join(f"{by} -> {picked.tolist()}" for by, picked in chosen.items()))
    centers = local_sampler.center_images()
    probe = max(range(len(seeds)), key=lambda i: len({int(chosen[by][i]) for by in chosen}))  # most disagreement
    for by, picked in chosen.items():
        body = {"seeds": seeds, "psi": 0.0, "truncation": "multimodal", "assignment": by, "format": "npy"}
        # G(c_picked) drawn as the replica draws this request: same pass, and torch on the replica's one
        # thread (serve num_cpus 1); CPU kernels on another thread count may round a pixel differently
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            forced = local_sampler.render_specs([SampleSpec(s, 0.0, "multimodal", int(k))
                                                 for s, k in zip(seeds, picked)])
        finally:
            torch.set_num_threads(threads)
        assert np.array_equal(npy(client.post("/v1/samples", json=body)), forced), by
        # the JSON answer names the center each image went to (the sampler page's hover shows it)
        named = client.post("/v1/samples", json={**body, "format": "png"}).json()["clusters"]
        assert named == picked.tolist(), (by, named)
        one = client.get("/v1/sample", params={"seed": seeds[probe], "psi": 0.0, "assignment": by, "format": "npy"})
        assert np.array_equal(npy(one), centers[int(picked[probe])]), by
    default = npy(client.get("/v1/sample", params={"seed": seeds[probe], "psi": 0.0, "format": "npy"}))
    assert np.array_equal(default, centers[int(chosen["learned"][probe])])


GET_CASES = [
    ({"seed": 1, "assignment": "nearest"}, "assignment"),
    ({"seed": 1, "truncation": "mean", "assignment": "w"}, "assignment"),
    ({"seed": 1, "psi": 1.5}, "psi"), ({"seed": 1, "psi": "abc"}, "psi"), ({"seed": 1, "truncation": "clamp"}, "truncation"),
    ({"seed": 1, "cluster": 6}, "cluster"), ({"seed": 1, "cluster": -1}, "cluster"), ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"), ({}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": 1, "format": "jpg"}, "format"),
    ({"seed": 1, "truncation": "mean", "cluster": 1}, "cluster"),
]
POST_CASES = [
    ({"seeds": [1], "assignment": "euclid"}, "assignment"),
    ({"seeds": [1], "cluster": 1, "assignment": "lpips"}, "assignment"),
    ({"seeds": list(range(17))}, "seeds"), ({"count": 17, "seed": 0}, "count"), ({"seeds": ["a"]}, "seeds.0"),
    ({"seeds": [-1]}, "seeds.0"), ({"seeds": [2**32]}, "seeds.0"), ({"seeds": [1], "psi": 2}, "psi"),
    ({"seeds": [1], "bogus": 1}, "bogus"), ({"psi": 0.5}, "seeds"), ({"count": 2, "seed": 2**32 - 1}, "count"),
    ({"seeds": [1], "truncation": "global"}, "truncation"), ({"seeds": [1], "cluster": 99}, "cluster"),
    ({"seeds": [1], "psi": "high"}, "psi"), ({"seeds": [1], "format": "gif"}, "format"), ([1, 2], "body"),
]


def assert_names_field(response: httpx.Response, field: str) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    payload = response.json()
    assert field in payload["detail"], payload
    assert any(field in e["field"] or field in e["message"] for e in payload["errors"]), payload


@pytest.mark.parametrize("params, field", GET_CASES)
def test_bad_get_input_is_a_4xx_naming_the_field(client, params, field):
    assert_names_field(client.get("/v1/sample", params=params), field)


@pytest.mark.parametrize("body, field", POST_CASES)
def test_bad_post_input_is_a_4xx_naming_the_field(client, body, field):
    assert_names_field(client.post("/v1/samples", json=body), field)


def test_malformed_json_is_a_4xx(client):
    r = client.post("/v1/samples", content=b'{"seeds": [1,', headers={"content-type": "application/json"})
    assert_names_field(r, "body")


async def _load(base: str, clients: int, duration_s: float, stop: threading.Event | None = None) -> dict:
    """``clients`` concurrent loops of single-image requests (plus small POSTs) for ``duration_s``."""
    stats = {"ok": 0, "errors": [], "latencies": []}
    deadline = time.monotonic() + duration_s

    async def one_client(i: int, c: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            t0 = time.monotonic()
            try:
                if n % 4 == 3:
                    r = await c.post("/v1/samples", json={"seeds": [i, n], "psi": 0.7, "format": "npy"})
                else:
                    r = await c.get("/v1/sample", params={"seed": i * 1000 + n, "psi": 0.7, "truncation": "mean"})
                if r.status_code == 200:
                    stats["ok"] += 1
                    stats["latencies"].append(time.monotonic() - t0)
                else:
                    stats["errors"].append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as err:
                stats["errors"].append(repr(err))
            n += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
        await asyncio.gather(*(one_client(i, c) for i in range(clients)))
    return stats


@pytest.mark.slow
def test_load_32_clients_zero_errors(app):
    stats = asyncio.run(_load(app["base"], clients=32, duration_s=LOAD_S))
    assert stats["errors"] == []
    assert stats["ok"] >= 32, stats["ok"]


def _sampler_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["sdsg"].deployments["SamplerDeployment"]
    return deployment.replica_states.get("RUNNING", 0)


def _gpus_held() -> float:
    """GPUs reserved on the cluster right now (only sampler replicas ask for GPUs in this module)."""
    import ray

    return ray.cluster_resources().get("GPU", 0.0) - ray.available_resources().get("GPU", 0.0)


def _wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.5)
    import ray
    from ray import serve

    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; available {ray.available_resources()}; "
                         f"{serve.status().applications['sdsg'].deployments['SamplerDeployment']}")


@pytest.mark.slow
def test_autoscaling_on_gpu_nodes(app):
    """Last in this module: redeploys the sampler on the workers' logical GPUs with autoscaling 1 -> 2 -> 1."""
    from serve_app.app import start_app

    config = serve_config(
        app["ckpt"], app["clusters"], app["port"], num_gpus=1, min_replicas=1, max_replicas=2,
        target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=2, look_back_period_s=2,
        metrics_interval_s=0.5, max_batch_size=4, max_ongoing_requests=8,
    )
    base = start_app(config)
    # Generous bounds: a replica start (a new worker importing torch) takes seconds on a quiet box, a minute or
    # more on an overloaded one.
    _wait_for(lambda: _sampler_replicas() == 1 and _gpus_held() == 1.0, 120, "one replica holding one GPU")

    stop = threading.Event()
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(asyncio.run(_load(base, 12, 240.0, stop))))
    loader.start()
    try:
        _wait_for(lambda: _sampler_replicas() == 2 and _gpus_held() == 2.0, 180,
                  "upscale to 2 replicas holding one GPU each")
    finally:
        stop.set()
        loader.join(timeout=90)
    assert not loader.is_alive()
    assert result["errors"] == [] and result["ok"] > 0
    _wait_for(lambda: _sampler_replicas() == 1 and _gpus_held() == 1.0, 120, "downscale to 1 replica when idle")
    assert httpx.get(f"{base}/v1/sample", params={"seed": 1}, timeout=60).status_code == 200
