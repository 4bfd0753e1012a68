#!/usr/bin/env bash
# Refresh the committed dependency locks from pyproject.toml (one command: `bash infra/lock.sh`).
#
#   requirements-dev.lock  every dependency of sdsg-ray and its [dev] extra (the test command installs it)
#   requirements.lock      the runtime subset at the same versions (the demo, the Docker image, runtime_env)
#
# uv resolves one set for every supported Python (3.10+) and platform (`--universal` with the
# `fewest` fork strategy: one version per package wherever possible) with sha256 hashes, in seconds;
# pip installs the result. Pins already in the locks are kept; pass --upgrade to move to the newest
# versions the ranges in pyproject.toml allow (then run the test suite before committing).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tools="${SDSG_LOCK_TOOLS:-${TMPDIR:-/tmp}/sdsg-lock-tools}"
if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
common=(-c infra/lock-constraints.txt --universal --fork-strategy fewest --python-version 3.10 --generate-hashes --quiet
        --no-header "$@")
"$tools/bin/uv" pip compile pyproject.toml --extra dev "${common[@]}" -o requirements-dev.lock
"$tools/bin/uv" pip compile pyproject.toml -c requirements-dev.lock "${common[@]}" -o requirements.lock
echo "wrote requirements-dev.lock ($(grep -c '^[a-z]' requirements-dev.lock) packages) and requirements.lock ($(grep -c '^[a-z]' requirements.lock) packages)"
