"""The project's own promises: README set-up commands, CI running that same command, CLI <-> jobs wiring."""

from __future__ import annotations

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


def lock_pins(name: str) -> dict[str, list[tuple[str, str | None, int]]]:
    """``requirements*.lock`` -> {normalised package name: [(version, marker or None, number of hashes)]}."""
    from packaging.utils import canonicalize_name

    pins: dict[str, list[tuple[str, str | None, int]]] = {}
    text = (REPO / name).read_text().replace("\\\n", " ")  # join the hash continuation lines
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec, _, marker = line.split("--hash")[0].partition(";")
        package, _, version = spec.strip().partition("==")
        assert version, f"{name}: {line[:80]!r} is not pinned with =="
        pins.setdefault(canonicalize_name(package.split("[")[0]), []).append(
            (version.strip(), marker.strip() or None, line.count("--hash=sha256:")))
    return pins


def pyproject_requirements() -> dict[str, list]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own TOML parser
        import tomli as tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {
        "requirements.lock": [Requirement(r) for r in project["dependencies"]],
        "requirements-dev.lock": [Requirement(r) for extra in project["optional-dependencies"].values()
                                  for r in extra] + [Requirement(r) for r in project["dependencies"]],
    }


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-dev.lock"])
def test_every_pyproject_dependency_is_locked_within_its_range_with_hashes(lock):
    """A dependency added to pyproject.toml but not to the lock (or locked outside its range) fails here:
    the README, CI, the Docker image and runtime_env all install the lock, never the ranges."""
    from packaging.utils import canonicalize_name

    pins = lock_pins(lock)
    for requirement in pyproject_requirements()[lock]:
        name = canonicalize_name(requirement.name)
        if name not in pins:
            pytest.fail(f"{requirement} is in pyproject.toml but not in {lock}: run `bash infra/lock.sh`")
        for version, _marker, hashes in pins[name]:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock} pins {name}=={version} outside pyproject.toml's {requirement}: run `bash infra/lock.sh`")
            assert hashes >= 1, f"{lock}: {name} has no --hash"


def test_runtime_lock_is_the_dev_lock_without_the_dev_extra():
    """One resolution: every runtime pin is the dev lock's pin, so the demo runs what the tests tested."""
    runtime, dev = lock_pins("requirements.lock"), lock_pins("requirements-dev.lock")
    for name, pins in runtime.items():
        assert name in dev, f"{name} is in requirements.lock but not requirements-dev.lock"
        assert {v for v, _, _ in pins} <= {v for v, _, _ in dev[name]}, (name, pins, dev[name])


def test_this_environment_holds_the_locked_versions_of_the_direct_dependencies():
    """CI installs the lock; a direct dependency at another version means it did not."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.markers import Marker
    from packaging.utils import canonicalize_name

    pins = lock_pins("requirements-dev.lock")
    for requirement in pyproject_requirements()["requirements-dev.lock"]:
        name = canonicalize_name(requirement.name)
        wanted = [v for v, marker, _ in pins[name] if marker is None or Marker(marker).evaluate()]
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        assert installed is not None and installed.split("+")[0] in {w.split("+")[0] for w in wanted}, (
            f"{name} {installed} is installed, the lock says {wanted}: install with the README's command")


def test_every_command_and_job_module_resolves_to_a_function():
    from sdsg_ray.stages import STAGES

    for name, command in COMMANDS.items():
        assert callable(command.run()), name
    assert all(callable(stage) for stage in STAGES.values()) and set(STAGES) <= set(COMMANDS)
    for job in sorted((REPO / "jobs").glob("*.py")):
        if job.stem == "__init__":
            continue
        text = job.read_text()
        (name,) = re.findall(r'main\(\["([a-z-]+)"', text)
        assert name in COMMANDS, f"{job.name} calls unknown command {name}"


def test_the_library_calls_functions_not_strings_and_never_imports_the_cli():
    """One way to reach a stage: the function itself (sdsg_ray.stages); only jobs/ wrap the CLI."""
    for path in [*(REPO / "sdsg_ray").rglob("*.py"), *(REPO / "serve_app").glob("*.py")]:
        text = path.read_text()
        assert "import_module" not in text, path
        assert "ray.serve._private" not in text, path
        assert "import s3fs" not in text, path
        if path.name not in ("cli.py", "__main__.py"):  # the command line and `python -m sdsg_ray`
            assert not re.search(r"^\s*(from sdsg_ray\.cli|import sdsg_ray\.cli)", text, re.M), path


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


def test_no_test_or_script_finds_processes_by_name_across_the_machine():
    """On a shared machine a name (``ray::RayTrainWorker``, ``raylet``) matches other people's processes
    too: tests and scripts end only what they started, by PID (``conftest.cluster_worker_pids`` finds
    them inside the test's own cluster). This keeps machine-wide matchers out of tests, scripts and code."""
    machine_wide = re.compile(
        r"\b(pkill|killall|pgrep|pidof)\b"  # the shell tools
        r"|process_iter\s*\("  # psutil over every process
        r"|/proc/[^\s'\"]*/cmdline|listdir\(\s*['\"]/proc"  # the same by hand
        r"|['\"]ray['\"]\s*,\s*['\"]stop['\"]|^\s*ray stop\b",  # `ray stop` stops every Ray on the machine
        re.MULTILINE,
    )
    suffixes = {".py", ".sh", ".yml", ".yaml", ".toml", ".cfg", ""}
    found = []
    for folder in ("tests", "bench", "infra", ".ci", "sdsg_ray", "serve_app", "jobs"):
        for path in sorted((REPO / folder).rglob("*")):
            if not path.is_file() or path.suffix not in suffixes or path == Path(__file__).resolve():
                continue
            text = path.read_text(errors="replace")
            found += [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                      for m in machine_wide.finditer(text)]
    assert not found, found
