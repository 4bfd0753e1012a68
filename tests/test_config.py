"""Config validation names the bad field, from YAML, from overrides, and through the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdsg_ray.cli import main
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
    """The installed entry point path: ``python -m sdsg_ray.cli`` in a fresh process."""
    out = tmp_path / "ds"
    proc = subprocess.run(
        [sys.executable, "-m", "sdsg_ray.cli", "make-dataset", "--out", str(out), "--n", "12", "--resolution", "16",
         "--outlier-fraction", "0.5", "--seed", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"outliers": 6' in proc.stdout
    assert len(list((out / "images").iterdir())) == 12 and (out / "labels.csv").is_file()
