"""The project's own promises: README set-up commands, CI running that same command, CLI <-> jobs wiring."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdsg_ray.cli import COMMANDS, build_parser, config_from_args

REPO = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    """The commands in the README's set-up block (a ```bash fence right after '## Quick start')."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert match, "README.md needs a '## Quick start' section with a ```bash block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = readme_setup_commands()
    assert len(commands) == 2, commands
    install_and_demo, install_and_test = commands
    assert "sdsg demo" in install_and_demo
    assert "pytest" in install_and_test
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert install_and_test in ci_lines, "CI must run the README's test command verbatim"


def test_every_cli_target_and_job_module_resolves():
    for name, command in COMMANDS.items():
        module_name, func_name = command.target.split(":")
        assert callable(getattr(importlib.import_module(module_name), func_name)), name
    for job in sorted((REPO / "jobs").glob("*.py")):
        if job.stem == "__init__":
            continue
        text = job.read_text()
        (name,) = re.findall(r'main\(\["([a-z-]+)"', text)
        assert name in COMMANDS, f"{job.name} calls unknown command {name}"


def test_flags_override_set_which_overrides_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  kimg: 5\n  workers: 3\nmodel:\n  resolution: 64\n")
    args = build_parser().parse_args(
        ["train", "--config", str(cfg), "--set", "train.workers=2", "--set", "train.kimg=7", "--kimg", "9"]
    )
    config = config_from_args(args)
    assert config.model.resolution == 64  # from YAML
    assert config.train.workers == 2  # --set beats YAML
    assert config.train.kimg == 9  # the flag beats --set


@pytest.mark.parametrize(
    "argv, field",
    [
        (["train", "--resolution", "48"], "model.resolution"),
        (["train", "--set", "train.lpips_treshold=0.3"], "train.lpips_treshold"),
        (["select", "--min-size", "0"], "select.min_size"),
        (["serve", "--port", "70000"], "serve.port"),
    ],
)
def test_bad_cli_values_exit_2_naming_the_field(argv, field):
    proc = subprocess.run(
        [sys.executable, "-m", "sdsg_ray.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert field in proc.stderr, proc.stderr
