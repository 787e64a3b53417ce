#!/usr/bin/env bash
# What a GPU machine of this workplace lacks for bench/gpu_check.sh, gathered into .gpu/ (git-ignored;
# name it in the device call's `carry`): MNIST's four idx files gzipped (~11 MB), and wheels for the
# packages its image does not hold (jsonschema and its pure-Python/cp312 dependencies; the image has
# PyTorch, Triton, PyYAML, tqdm, matplotlib, attrs and pytest). Run once here, from the repository root:
#
#   bash bench/gpu_carry.sh
#
# then, on the device (one call; docs/gpu/README.md):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
#       .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site && PY=python3 bash bench/gpu_check.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/MNIST/raw .gpu/wheels
[ -e data/MNIST/raw/train-images-idx3-ubyte ] || $PY -m trainability.data --root data
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    gzip -9 -c "data/MNIST/raw/$f" > ".gpu/MNIST/raw/$f.gz"
done
# the versions installed here; cp312 manylinux wheels for the image's Python 3.12
pkgs=$($PY -m pip show jsonschema referencing jsonschema-specifications rpds-py \
    | awk '/^Name:/{n=$2} /^Version:/{print n "==" $2}')
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels $pkgs
du -sh .gpu
