#!/usr/bin/env bash
# The suite on the newest JAX and a newer Python than CI's: what notebook runtimes ship today.
#
#     bash bench/newest_jax.sh [PYTHON]     # PYTHON: a python3.12 or 3.13 (default: python3.12 on PATH)
#
# A fresh virtual environment, sdmagic with its test extra and the newest jax/jaxlib (0.12.x), then
# the README's test command. CI (.ci/run) runs the same suite on the machine's Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3.12}"
# The venv (about 6 GB with torch) and the model home go when the run ends, pass or fail.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
venv="$scratch/venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e ".[test]" "jax>=0.12,<0.13"
"$venv/bin/python" -c "import sys, jax; print(f'Python {sys.version.split()[0]}, jax {jax.__version__}')"
export SDMAGIC_HOME="$scratch/sdmagic-home"
"$venv/bin/python" -m pytest -q -p no:cacheprovider
