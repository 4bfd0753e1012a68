"""The project's own promises: README set-up commands, CI running that same command, CLI <-> jobs wiring,
the layers and the written contract (docs/architecture.md) against the code."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, build_parser, config_from_args

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
    assert all(callable(command.run) for command in COMMANDS.values())
    for job in sorted((REPO / "jobs").glob("*.py")):
        if job.stem in ("__init__", "cli"):
            continue
        text = job.read_text()
        (name,) = re.findall(r'main\(\["([a-z-]+)"', text)
        assert name in COMMANDS, f"{job.name} calls unknown command {name}"


def test_the_library_calls_functions_not_strings():
    """One way to reach a stage: the function itself (the command table in jobs/cli.py)."""
    for path in [*(REPO / "sdsg_ray").rglob("*.py"), *(REPO / "serve_app").glob("*.py"), *(REPO / "jobs").glob("*.py")]:
        text = path.read_text()
        assert "import_module" not in text, path
        assert "ray.serve._private" not in text, path
        assert "import s3fs" not in text, path


def test_help_does_not_import_torch_or_ray():
    """The command table defers its stages (torch, Ray): `sdsg --help` and a subcommand's --help answer at once."""
    probe = ("import sys; from jobs.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


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
        [sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=120
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


# ----- layers: foundation < pure < artifacts & I/O < stages < app; no cycles -------------------------

FOUNDATION, PURE, ARTIFACTS, STAGES, APP = range(5)
LAYERS = {
    "sdsg_ray": FOUNDATION, "sdsg_ray.errors": FOUNDATION, "sdsg_ray.registry": FOUNDATION,
    "sdsg_ray.perceptual": FOUNDATION, "sdsg_ray.config": PURE,
    "sdsg_ray.models": PURE, "sdsg_ray.models.networks": PURE, "sdsg_ray.training.losses": PURE,
    "sdsg_ray.filtering.selection": PURE, "sdsg_ray.distances": PURE, "sdsg_ray.diagnostics": ARTIFACTS,
    "sdsg_ray.truncation": PURE, "sdsg_ray.truncation.assign": PURE, "sdsg_ray.truncation.modes": PURE,
    "sdsg_ray.storage": ARTIFACTS, "sdsg_ray.shards": ARTIFACTS, "sdsg_ray.manifest": ARTIFACTS,
    "sdsg_ray.imaging": ARTIFACTS, "sdsg_ray.pretrained": ARTIFACTS, "sdsg_ray.figures": ARTIFACTS,
    "sdsg_ray.ray_utils": ARTIFACTS, "sdsg_ray.nvidia_pickle": ARTIFACTS, "sdsg_ray.artifacts": ARTIFACTS,
    **{f"sdsg_ray.artifacts.{name}": ARTIFACTS for name in (
        "base", "checkpoint", "clusters", "dataset", "evaluation", "generated", "json_file", "layout", "report",
        "scores", "selection")},
    "sdsg_ray.dataset": STAGES, "sdsg_ray.dataset.synthetic": STAGES, "sdsg_ray.training": STAGES,
    "sdsg_ray.training.loop": STAGES, "sdsg_ray.training.data": STAGES, "sdsg_ray.distributed": STAGES,
    "sdsg_ray.distributed.train": STAGES, "sdsg_ray.filtering": STAGES,
    **{f"sdsg_ray.filtering.{name}": STAGES for name in ("score", "scorer", "select", "decode", "curation_page")},
    **{f"sdsg_ray.truncation.{name}": STAGES for name in ("clusters", "sampler", "generate", "learned")},
    "sdsg_ray.evaluation": STAGES,
    **{f"sdsg_ray.evaluation.{name}": STAGES for name in ("evaluate", "features", "report", "truncation_curves")},
    "sdsg_ray.export": STAGES, "sdsg_ray.ingest": STAGES,
    **{f"sdsg_ray.ingest.{name}": STAGES for name in ("download", "policy", "run", "urls")},
    "sdsg_ray.pipeline": STAGES, "sdsg_ray.demo": STAGES,
    "jobs": APP, **{f"jobs.{path.stem}": APP for path in (REPO / "jobs").glob("*.py") if path.stem != "__init__"},
    "serve_app": APP, "serve_app.app": APP, "serve_app.deployments": APP, "serve_app.schemas": APP,
}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of sdsg_ray, serve_app and jobs (a package as its __init__)."""
    modules = {}
    for package in ("sdsg_ray", "serve_app", "jobs"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The project modules ``path`` imports: (at module level, anywhere incl. function bodies). ``from a
    import b`` counts as ``a.b`` when that is a module; imports under ``if TYPE_CHECKING`` do not run."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    top_level = {id(n) for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    top_level |= {id(n) for cls in tree.body if isinstance(cls, ast.ClassDef) for stmt in cls.body
                  if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(stmt)}
    module_level, anywhere = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        names = [n for n in names if n.split(".")[0] in ("sdsg_ray", "serve_app", "jobs")]
        if id(node) in type_only:
            continue
        anywhere.update(names)
        if id(node) in top_level:
            module_level.update(names)
    return module_level, anywhere


# The one import that points up, inside a function: a metric entry builds its torch network only when asked,
# so that the config (which validates metric names against the registry) imports no torch.
DEFERRED_FOR_TORCH = {("sdsg_ray.perceptual", "sdsg_ray.pretrained")}


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_below():
    modules = project_modules()
    assert not sorted(set(modules) - set(LAYERS)), "modules without a layer in tests/test_project.py::LAYERS"
    assert not sorted(set(LAYERS) - set(modules)), "stale rows in LAYERS"
    upward = []
    for name, path in modules.items():
        _, anywhere = imported_modules(path, modules)
        for target in anywhere:
            if name.startswith("sdsg_ray") and target.split(".")[0] in ("serve_app", "jobs"):
                upward.append(f"{name} imports the app {target}")
            elif (LAYERS.get(target, LAYERS.get(target.rsplit(".", 1)[0], APP)) > LAYERS[name]
                  and (name, target) not in DEFERRED_FOR_TORCH):
                upward.append(f"{name} (layer {LAYERS[name]}) imports {target} (layer {LAYERS.get(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_the_module_level_import_graph_has_no_cycles():
    modules = project_modules()
    graph = {name: {t for t in imported_modules(path, modules)[0] if t in modules} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path + [node, target]
            if target not in state and (cycle := visit(target, path + [node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


# ----- the written contract: artifact handles, their files, docs/architecture.md ---------------------


def artifact_handles() -> dict[str, type]:
    """Class name -> every Artifact subclass defined in sdsg_ray.artifacts."""
    import sdsg_ray.artifacts
    from sdsg_ray.artifacts.base import Artifact

    handles = {}
    for info in pkgutil.iter_modules(sdsg_ray.artifacts.__path__):
        module = importlib.import_module(f"sdsg_ray.artifacts.{info.name}")
        handles.update({name: value for name, value in vars(module).items() if isinstance(value, type)
                        and issubclass(value, Artifact) and value is not Artifact and value.__module__ == module.__name__})
    return handles


# Besides sdsg_ray/artifacts/, the low-level codecs that define their own file layout may spell names.
CODECS = {"sdsg_ray/storage.py", "sdsg_ray/manifest.py", "sdsg_ray/shards.py"}
# Names that only look like an artifact's: (file, string) -> what it is.
NOT_ARTIFACTS = {("serve_app/deployments.py", "index.html"): "the Serve app's own page (package data), not Report.index"}


def test_artifact_file_names_are_spelled_only_in_the_artifacts_layer():
    """A string constant naming an artifact's file (``"kept.parquet"``, ``f"{out}/inference.pt"``) or ending a
    path in one of its directories (``"runs/stage1"``) outside sdsg_ray/artifacts/ is a second spelling.
    HTTP routes (``"/v1/clusters"``) are not storage paths."""
    members = {m.name for handle in artifact_handles().values() for m in handle.members().values()}
    files = {name for name in members if "." in name.rsplit("/", 1)[-1]}
    found = []
    for folder in ("sdsg_ray", "serve_app", "jobs"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("sdsg_ray/artifacts/") or rel in CODECS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or node.value.startswith("/")
                        or (rel, node.value) in NOT_ARTIFACTS):
                    continue
                hits = [name for name in members if node.value.endswith("/" + name)
                        or (name in files and node.value == name)]
                found += [f"{rel}:{node.lineno}: {node.value!r} spells {name}" for name in hits]
    assert not found, "\n".join(found)


def documented_members() -> set[tuple[str, str, str]]:
    """(handle, member, file) rows of docs/architecture.md's artifact-member table."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = re.search(r"\| handle \| member \| file \| what it holds \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)", text)
    assert table, "docs/architecture.md needs the table '| handle | member | file | what it holds |'"
    rows = set()
    for line in table.group(1).splitlines():
        handle, member, file = (cell.strip().strip("`") for cell in line.strip("|").split("|")[:3])
        rows.add((handle, member, file))
    return rows


def test_the_architecture_table_lists_every_artifact_member():
    code = {(handle, attr, m.name) for handle, cls in artifact_handles().items()
            for attr, m in cls.members().items()}
    documented = documented_members()
    assert not sorted(code - documented), "members missing from docs/architecture.md's artifact table"
    assert not sorted(documented - code), "stale rows in docs/architecture.md's artifact table"
