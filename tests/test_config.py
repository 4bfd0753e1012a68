"""Config validation names the bad field, from YAML, from overrides, and through the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from jobs.cli import main
from sdsg_ray.config import ConfigError, load_config


def test_defaults_yaml_and_overrides_combine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  n: 50\n  seed: 3\nstorage:\n  endpoint_url: http://127.0.0.1:9000\n")
    config = load_config(path, ["dataset.n=7", "dataset.outlier_fraction=0.25"])
    assert config.dataset.n == 7 and config.dataset.seed == 3 and config.dataset.outlier_fraction == 0.25
    assert config.storage.endpoint_url == "http://127.0.0.1:9000"
    assert load_config(None, {"dataset.resolution": 64}).dataset.resolution == 64


def test_bad_value_in_yaml_names_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  outlier_fraction: 1.5\n")
    with pytest.raises(ConfigError, match=r"dataset\.outlier_fraction"):
        load_config(path)


def test_bad_override_names_field():
    with pytest.raises(ConfigError, match=r"dataset\.n"):
        load_config(None, ["dataset.n=-3"])
    with pytest.raises(ConfigError, match=r"dataset\.n"):
        load_config(None, ["dataset.n=many"])


def test_bad_serve_assign_resolution_is_named():
    with pytest.raises(ConfigError, match=r"serve\.assign_resolution.*power of two"):
        load_config(None, ["serve.assign_resolution=12"])
    assert load_config(None, ["serve.assign_resolution=16"]).serve.assign_resolution == 16


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  n_images: 5\n")
    with pytest.raises(ConfigError, match=r"dataset\.n_images"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"storage\.endpoint"):
        load_config(None, ["storage.endpoint=http://x"])


def test_cli_bad_flag_exits_2_naming_field(capsys):
    with pytest.raises(SystemExit) as info:
        main(["make-dataset", "--n", "-3"])
    assert info.value.code == 2
    assert "dataset.n" in capsys.readouterr().err


def test_cli_runs_make_dataset_end_to_end(tmp_path):
    """The installed entry point path: ``python -m jobs.cli`` in a fresh process."""
    out = tmp_path / "ds"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "make-dataset", "--out", str(out), "--n", "12", "--resolution", "16",
         "--outlier-fraction", "0.5", "--seed", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"outliers": 6' in proc.stdout  # the stage's result, as JSON on stdout
    assert len(list((out / "images").iterdir())) == 12 and (out / "labels.csv").is_file()


# ----- layers: default < command (demo) < --config < --set < flags, each field remembering its layer ----


def _print_config(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv, "--print-config"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {"text": proc.stdout, "config": yaml.safe_load(proc.stdout)}


def test_an_explicit_value_equal_to_the_schema_default_is_kept_by_the_demo():
    """The demo's own default θ is 0.2; a user who sets the paper's 0.36 (the schema default) gets 0.36."""
    shown = _print_config("demo", "--set", "select.target_threshold=0.36")
    assert shown["config"]["select"]["target_threshold"] == 0.36
    assert "target_threshold: 0.36  # set" in shown["text"]
    untouched = _print_config("demo")
    assert untouched["config"]["select"]["target_threshold"] == 0.2
    assert "target_threshold: 0.2  # command" in untouched["text"]


def test_print_config_names_the_layer_of_each_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  kimg: 5\n  workers: 3\n  seed: 4\n")
    shown = _print_config("train", "--config", str(path), "--set", "train.workers=2", "--kimg", "9")
    text, train = shown["text"], shown["config"]["train"]
    assert train["kimg"] == 9 and "kimg: 9.0  # flag" in text
    assert train["workers"] == 2 and "workers: 2  # set" in text
    assert train["seed"] == 4 and f"seed: 4  # file {path}" in text
    assert "  batch_size: 8\n" in text  # a default carries no layer
    assert "  out: runs/stage1  # derived from pipeline.root\n" in text  # a path no layer set


def test_derived_stage_uris_never_replace_a_value_a_layer_set():
    from sdsg_ray.artifacts.layout import with_layout_defaults
    from sdsg_ray.config import DERIVED_LAYER, build_config

    default_out = with_layout_defaults(build_config()).train.out  # what the default root derives
    derived = with_layout_defaults(build_config(("set", {"pipeline.root": "/r"})))
    assert derived.train.out == "/r/stage1" and derived.score.checkpoint == derived.train.out
    assert derived.source("train.out") == DERIVED_LAYER and not derived.is_set("train.out")
    kept = with_layout_defaults(build_config(("set", {"pipeline.root": "/r", "train.out": default_out})))
    assert kept.train.out == default_out  # set explicitly to the default's value: still the user's
    assert with_layout_defaults(kept).train.out == default_out and kept.score.checkpoint == "/r/stage1"


def test_config_equality_ignores_where_values_came_from():
    from sdsg_ray.config import build_config

    assert build_config(("command", {"train.kimg": 3})) == build_config(("flag", {"train.kimg": 3}))
    assert build_config(("set", {"train.kimg": 3})) != build_config()


def test_help_shows_each_flags_description():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())
    assert "Training length in thousands of real images shown. [train.kimg]" in help_text
    assert "--print-config" in help_text and "--debug" in help_text


# ----- user errors: one line on stderr, a non-zero exit; --debug shows the traceback ------------------


@pytest.mark.parametrize("argv, message", [
    (["score", "--checkpoint", "/tmp/sdsg-nope", "--data", "/tmp/sdsg-nope-data"], "/tmp/sdsg-nope/inference.pt: no such object"),
    (["select", "--scores", "/tmp/sdsg-nope"], "/tmp/sdsg-nope/summary.json"),
    (["cluster", "--checkpoint", "/tmp/sdsg-nope"], "/tmp/sdsg-nope/inference.pt: no such object"),
    (["train", "--data", "/tmp/sdsg-nope"], "/tmp/sdsg-nope: no images and no manifest"),
])
def test_a_user_error_is_one_line_without_a_traceback(argv, message):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "jobs.cli", *argv, "--debug"], capture_output=True, text=True,
                           timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and message in debug.stderr
