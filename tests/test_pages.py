"""The two pages in a real browser: headless Chromium (Debian's package) driven by Selenium through Debian's
chromedriver. The sampler page runs against the real service (local Ray + Serve, real HTTP, a tiny model);
the curation page is opened from file:// as `sdsg select` wrote it. Every wait is bounded.

Without Chromium the tests skip, unless SDSG_REQUIRE_BROWSER is set (`.ci/run` sets it after installing
Chromium), where they fail. SDSG_SCREENSHOTS=<dir> saves what the browser showed."""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port
from PIL import Image
from test_curation_page import make_small_selection, page_data
from test_serve import serve_config
from test_truncation import make_tiny_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 60  # the bound on every wait for the page; a loaded 2-core CI box renders samples in seconds
BROWSER_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1100")


def _screenshot(driver, name: str) -> None:
    folder = os.environ.get("SDSG_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("SDSG_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)")
        pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sdsg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, predicate, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: predicate(d))
    except TimeoutException:
        raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}") from None


# ---------------------------------------------------------------------------------------------------------
# The sampler page at / of the service


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    from serve_app.app import start_app

    ckpt, clusters = make_tiny_model(tmp_path_factory.mktemp("pages"))
    # serve.default_psi other than the page's own 0.7: the page must start where the service says
    base = start_app(serve_config(ckpt, clusters, free_port(), default_psi=0.6))
    yield base
    serve.shutdown()  # give the cluster's resources back to the other test modules


def shown(driver) -> list[dict]:
    """The samples on the page: alt text, reproduce link, and the PNG bytes of each."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid figure')].map(f => ({alt: f.querySelector('img').alt,"
        " src: f.querySelector('img').src, href: f.querySelector('a').href,"
        " width: f.querySelector('img').naturalWidth}))")


def decode(src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def page_state(driver) -> dict:
    return driver.execute_script("return {requests: samplerPage.requests, body: samplerPage.lastBody,"
                                 " pending: samplerPage.pending !== null, shown: samplerPage.shown}")


@pytest.fixture
def sampler_page(browser, service):
    browser.get(service + "/")
    wait_for(browser, lambda d: len(shown(d)) == 8 and all(s["width"] == 32 for s in shown(d)), "8 decoded samples")
    return browser


def test_sampler_page_renders_the_service_samples(sampler_page, service):
    driver = sampler_page
    state = page_state(driver)
    assert state["requests"] == 1 and state["body"] == {"seed": 0, "count": 8, "psi": 0.6,
                                                        "truncation": "multimodal", "format": "png"}
    samples = shown(driver)
    # what the page shows is what the API answers for its one batched request
    api = httpx.post(f"{service}/v1/samples", json=state["body"], timeout=60).json()
    assert [s["src"].split(",", 1)[1] for s in samples] == api["images"]
    # the hover names the center the service chose, and forcing that center draws the same image
    center = api["clusters"][3]
    assert isinstance(center, int) and 0 <= center < 6
    assert samples[3]["alt"] == f"sample, seed 3, ψ 0.6, multimodal truncation, cluster {center} (nearest by learned)"
    forced = httpx.get(f"{service}/v1/sample", params={"seed": 3, "psi": 0.6, "cluster": center}, timeout=60)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(forced.content))), decode(samples[3]["src"]))
    # each image's link reproduces it, alone
    one = httpx.get(samples[3]["href"], timeout=60)
    assert one.status_code == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(one.content))),
                                                      decode(samples[3]["src"]))
    card = driver.find_element("id", "model-card").text
    assert "32 px" in card and "6 (metric stlpips-alex)" in card and "top-1" in card
    labels = driver.execute_script("return ['seed','count','psi','truncation','assignment'].map("
                                   "id => document.querySelector(`label[for=${id}]`) !== null)")
    assert all(labels)
    assert driver.execute_script("return document.querySelectorAll('#clusters button[aria-label^=\"cluster \"]').length") == 6
    _screenshot(driver, "sampler-page.png")


def test_moving_psi_with_the_keyboard_requests_new_images_once(sampler_page):
    from selenium.webdriver.common.keys import Keys

    driver = sampler_page
    before = shown(driver)
    driver.find_element("id", "psi").send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # two quick steps of 0.05
    wait_for(driver, lambda d: (page_state(d)["shown"] or {}).get("psi") == 0.7 and not page_state(d)["pending"],
             "samples at ψ 0.7")
    state = page_state(driver)
    assert state["requests"] == 2  # debounced: one batched request for both key presses
    after = shown(driver)
    assert all("ψ 0.7" in s["alt"] for s in after) and "psi=0.7" in after[0]["href"]
    assert all(not np.array_equal(decode(a["src"]), decode(b["src"])) for a, b in zip(after, before))
    # forcing a center: the next request names it, and the captions say so
    driver.find_element("css selector", '#clusters button[aria-label^="cluster 2 "]').click()
    wait_for(driver, lambda d: (page_state(d)["shown"] or {}).get("cluster") == 2, "samples at cluster 2")
    assert all("cluster 2" in s["alt"] for s in shown(driver)) and "cluster=2" in shown(driver)[0]["href"]


def test_a_bad_value_shows_the_api_message(sampler_page, service):
    driver = sampler_page
    seed = driver.find_element("id", "seed")
    seed.clear()
    seed.send_keys("-1")
    error = driver.find_element("id", "error")
    wait_for(driver, lambda d: error.is_displayed() and error.text, "the error message")
    body = page_state(driver)["body"]
    answer = httpx.post(f"{service}/v1/samples", json=body, timeout=60)
    assert answer.status_code == 422 and error.text == answer.json()["detail"] and error.text.startswith("seed:")
    seed.clear()
    seed.send_keys("5")  # fixing it clears the message and draws again
    wait_for(driver, lambda d: not error.is_displayed() and (page_state(d)["shown"] or {}).get("seed") == 5,
             "samples from seed 5")


# ---------------------------------------------------------------------------------------------------------
# The curation page written by `sdsg select`


@pytest.fixture(scope="module")
def curation(browser, tmp_path_factory):
    run = make_small_selection(tmp_path_factory.mktemp("curation-page"))
    browser.get(Path(run["page"]).as_uri())  # file://: no server
    wait_for(browser, lambda d: d.find_element("id", "kept").text.isdigit(), "the counts")
    return run


def counts(driver) -> tuple[float, int, int]:
    theta = driver.execute_script("return curation.data.report.curve[curation.indexOf()].theta")
    return theta, int(driver.find_element("id", "kept").text), int(driver.find_element("id", "removed").text)


def test_curation_page_counts_follow_theta_as_report_json_says(browser, curation):
    from selenium.webdriver.common.keys import Keys

    report = curation["report"]
    by_theta = {p["theta"]: p["size"] for p in report["curve"]}
    assert counts(browser) == (report["theta"], report["size_kept"], report["size_raw"] - report["size_kept"])
    # the "all outliers" row at the chosen θ is report.json's precision and recall
    row = browser.find_element("css selector", '#kinds tr[data-kind="all outliers"]').text.split()
    assert float(row[-2]) == pytest.approx(report["outliers"]["recall"], abs=5e-4)
    assert float(row[-1]) == pytest.approx(report["outliers"]["precision"], abs=5e-4)
    slider = browser.find_element("id", "theta")
    seen = set()
    for key, steps in ((Keys.ARROW_LEFT, 3), (Keys.ARROW_RIGHT, 6)):
        for _ in range(steps):
            slider.send_keys(key)
            theta, kept, removed = counts(browser)
            assert kept == by_theta[theta] and removed == report["size_raw"] - kept
            marked = browser.execute_script("return document.querySelectorAll('#grid .cell:not(.removed)').length")
            assert marked == kept  # every image is shown here, so the thumbnails marked kept are the count
            seen.add(theta)
    assert len(seen) >= 4 and len({by_theta[t] for t in seen}) >= 3  # the counts did move


def test_curation_page_thumbnails_and_detail(browser, curation):
    data = page_data(curation["page"])
    loaded = browser.execute_async_script(
        "const done = arguments[arguments.length - 1], img = new Image();"
        "img.onload = () => done(img.naturalWidth); img.onerror = () => done(-1);"
        "img.src = curation.data.thumbs.recon[0];")
    assert loaded == 32 * 32  # the sprite sheet beside the page loads from file://
    browser.find_elements("css selector", "#grid .cell")[-1].click()
    assert browser.find_element("id", "detail-pair").is_displayed()
    assert browser.find_element("id", "detail-d").text == str(data["items"][-1][1])
    assert "removed" in browser.find_element("id", "detail-state").text  # the highest d(x) is removed at θ
    assert browser.find_element("id", "detail-recon").value_of_css_property("background-image").endswith(
        'recon-000.jpg")')
    _screenshot(browser, "curation-page.png")
