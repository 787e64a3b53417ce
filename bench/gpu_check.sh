#!/usr/bin/env bash
# The GPU checks, as one script for one short GPU session (README: "The paper scale on one GPU";
# the results of one such run: docs/gpu/).
#
#   bash bench/gpu_check.sh [PROBE_BUDGET_S]      # writes logs and summaries to $OUT (default bench/out/gpu)
#
# 1. the batched-vs-single equivalence tests, on CUDA: first the two that gate step 2's keys (cuda_graph
#    against the eager step, fused_adam), then the rest (mixed batches: arms, L2 and Wasserstein,
#    activations, the global variant, BatchNorm) and the measurement tests;
# 2. the projected wall time of the whole paper scale (bench/project_paper.py): every job the Snakefile
#    plans, timed with its own configs for short tasks, projected to 40 tasks, one job at a time and two
#    at once (-> $OUT/projection.json), with cuda_graph and fused_adam on where step 1 passed them;
# 3. bench_batched: one at a time vs batched vs the batched step as a CUDA graph, with Adam compiled,
#    and both, for 1 and 93 models; then 93 models with a decision every K = 40;
# 4. bench/tf32_effect.py: one 5-epoch task of the paper stream with tf32 off and on (speed, record drift);
# 5. only with PROBE_BUDGET_S > 0: the paper-scale probe (bench/paper_probe.py), the first tasks of the
#    paper's stream, vanilla vs scheduler, L2, CReLU and Wasserstein; `bench/plot_probe.py` draws them.
# Most important first: if the lease ends early, the later steps are the ones lost. Steps 1-4 take at
# most 9 min 35 s (their timeouts: 100 + 120 + 180 + 80 + 55 + 40 s). DEVICE=cpu runs the same steps
# on the CPU as a try-out of the script (PROJECT_ARGS, BENCH_MODELS and TF32_ARGS then shrink them, e.g.
# PROJECT_ARGS="--jobs 1 --seeds 0 --set stream.n_images=2560 --set measure.every=4",
# BENCH_MODELS="1 3", BENCH_MODELS_MEASURE=3 and TF32_ARGS="--epochs 1 --set stream.n_images=2560").
# Uses the interpreter in $PY (default python3, e.g. a GPU image's own PyTorch); MNIST comes from
# data/MNIST/raw or, if absent, from the gzip idx copies in $MNIST_GZ (default .gpu/MNIST/raw).
set -u
OUT=${OUT:-bench/out/gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${1:-0}
mkdir -p "$OUT" data/MNIST/raw
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -e data/MNIST/raw/train-images-idx3-ubyte ] || cp "${MNIST_GZ:-.gpu/MNIST/raw}"/*.gz data/MNIST/raw/
t0=$(date +%s)
stamp() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

stamp "environment"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"

stamp "1. equivalence and measurement tests on $DEVICE"
# the two tests that gate step 2's keys first, on their own clock, so a slow rest cannot cost their
# verdicts; -v: a line per test as it ends (a timeout keeps the verdicts of the tests that ran); on CUDA
# the CPU stand-in of the graph (same_storages) is left out, the real graph test runs instead
KEY_TESTS="cuda_graph_step_equals_the_eager_step or fused_adam_equals_single_runs"
SKIP=$([ "$DEVICE" = cuda ] && echo " and not same_storages")
pytest_on() { TRAINABILITY_TEST_DEVICE=$DEVICE timeout "$1" $PY -m pytest -o addopts= -v -rfEs -p no:cacheprovider "${@:2}"; }
pytest_on 100 tests/test_batched.py -k "$KEY_TESTS" 2>&1 | tee "$OUT/tests.log" | grep -v " PASSED" | tail -12
pytest_on 120 tests/test_batched.py tests/test_measure.py "tests/test_train.py::test_resume_equals_uninterrupted" \
    -k "not cli and not paper_scale and not ($KEY_TESTS)$SKIP" 2>&1 | tee -a "$OUT/tests.log" \
    | grep -v " PASSED" | tail -25

# the speed-ups whose equivalence test passed in step 1 (one that failed or did not run is left out of step 2)
KEYS=""
grep -q "test_cuda_graph_step_equals_the_eager_step PASSED" "$OUT/tests.log" && KEYS="$KEYS --set cuda_graph=true"
grep -q "test_fused_adam_equals_single_runs PASSED" "$OUT/tests.log" && KEYS="$KEYS --set fused_adam=true"

stamp "2. the whole paper scale, projected from each job's measured cost (with:$KEYS)"
timeout 180 $PY bench/project_paper.py --device "$DEVICE" --out "$OUT/projection.json" $KEYS ${PROJECT_ARGS:-} \
    2>&1 | grep --line-buffered -v "^task" | tee "$OUT/projection.log"

stamp "3. batched vs one at a time; the batched step as a CUDA graph, with Adam compiled, and both"
GRAPH=$([ "$DEVICE" = cuda ] && echo --graph)
timeout 80 $PY bench/bench_batched.py --device "$DEVICE" --models ${BENCH_MODELS:-1 93} --steps 100 --rounds 2 \
    $GRAPH --fused 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.log"
timeout 55 $PY bench/bench_batched.py --device "$DEVICE" --models ${BENCH_MODELS_MEASURE:-93} --steps 120 --rounds 2 \
    --measure $GRAPH --fused 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/bench.log"

stamp "4. tf32: speed and the records, one short task of the paper stream"
timeout 40 $PY bench/tf32_effect.py --device "$DEVICE" --epochs 5 ${TF32_ARGS:-} 2>&1 | tee "$OUT/tf32.log"

if [ "$BUDGET" -gt 0 ]; then
    stamp "5. paper-scale probe"
    # vanilla and scheduled of each method, seeds 0-2, all three at once on the one GPU; records in /tmp
    for m in l2 crelu wass; do
        (timeout $((BUDGET + 60)) $PY bench/paper_probe.py --runs $m-vanilla $m-scheduled --seeds 0 1 2 \
            --budget-s "$BUDGET" --set indicators.enabled=false --set device="$DEVICE" --out "/tmp/probe-$m" \
            > "$OUT/probe_$m.log" 2>&1
         cp "/tmp/probe-$m/summary.json" "$OUT/probe_$m.json" 2>/dev/null) &
    done
    wait
    grep -h "\[probe\]" "$OUT"/probe_*.log
fi
stamp "done"
