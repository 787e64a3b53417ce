#!/usr/bin/env bash
# The GPU checks, as one script for one short GPU session (README: "The paper scale on one GPU";
# the results of one such run: docs/gpu/).
#
#   bash bench/gpu_check.sh [PROBE_BUDGET_S]      # writes logs and summaries to $OUT (default bench/out/gpu)
#
# 1. the batched-vs-single equivalence tests and the measurement tests, on CUDA;
# 2. bench_batched on CUDA: batched vs one-at-a-time, plain steps and with decisions every K = 40;
# 3. the paper-scale probe (bench/paper_probe.py): the first tasks of the paper's stream, vanilla vs
#    per-layer scheduler, L2, CReLU and Wasserstein side by side, within PROBE_BUDGET_S seconds
#    (default 260); then `bench/plot_probe.py $OUT/probe_*.json` draws them.
# It writes 8 files to $OUT (tests, bench, three probe logs, three probe summaries); a remote runner
# that returns only a few files (ours returned 8) should tee the console output elsewhere.
# Uses the interpreter in $PY (default python3, e.g. a GPU image's own PyTorch); MNIST comes from
# data/MNIST/raw or, if absent, from the gzip idx copies in $MNIST_GZ (default .gpu/MNIST/raw).
set -u
OUT=${OUT:-bench/out/gpu}
PY=${PY:-python3}
BUDGET=${1:-260}
mkdir -p "$OUT" data/MNIST/raw
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -e data/MNIST/raw/train-images-idx3-ubyte ] || cp "${MNIST_GZ:-.gpu/MNIST/raw}"/*.gz data/MNIST/raw/
t0=$(date +%s)
stamp() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

stamp "1. equivalence and measurement tests on CUDA"
TRAINABILITY_TEST_DEVICE=cuda timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_batched.py \
    tests/test_measure.py "tests/test_train.py::test_resume_equals_uninterrupted" \
    -k "not cli and not paper_scale" 2>&1 | tee "$OUT/tests.log" | tail -25

stamp "2. batched vs one at a time"
timeout 90 $PY bench/bench_batched.py --device cuda --models 1 3 9 27 93 --steps 200 --rounds 3 \
    2>&1 | tee "$OUT/bench.log"
timeout 75 $PY bench/bench_batched.py --device cuda --models 1 9 93 --steps 200 --rounds 3 --measure \
    2>&1 | tee -a "$OUT/bench.log"

stamp "3. paper-scale probe"
# one batched job per model shape / regulariser family, seeds 0-2, all three at once on the one GPU
# (each job is launch-bound; two at once ran at 0.86x solo speed each); records stay in /tmp
for m in l2 crelu wass; do
    (timeout $((BUDGET + 60)) $PY bench/paper_probe.py --runs $m-vanilla $m-scheduled --seeds 0 1 2 \
        --budget-s "$BUDGET" --set indicators.enabled=false --out "/tmp/probe-$m" > "$OUT/probe_$m.log" 2>&1
     cp "/tmp/probe-$m/summary.json" "$OUT/probe_$m.json" 2>/dev/null) &
done
wait
grep -h "\[probe\]" "$OUT"/probe_*.log
stamp "done"
