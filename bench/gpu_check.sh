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
#    plans, timed with its own configs for short tasks (a job of several task lengths phase by phase, its
#    stack shrinking as they end), projected to 40 tasks, one job at a time and two
#    at once (-> $OUT/projection.json), with cuda_graph and fused_adam on where step 1 passed them;
# 3. where a job's time goes (bench/decision_profile.py): plain and eager step, the decision step split
#    into Lanczos rounds, Algorithm 1 and the rest, the Wasserstein penalty alone, one round of Hessian-
#    vector products eager and as a CUDA graph, and a profiler's count of one decision's kernels;
# 4. the first two tasks of crelu-short's runs actually run (batched, the paper's configs: 2 x 23,500
#    steps of 3 models), to set against step 2's per-step costs (-> $OUT/whole_job.log);
# 5. bench_batched: one at a time vs batched vs the batched step as a CUDA graph, with Adam compiled,
#    and both, for 1 and 93 models; then 93 models with a decision every K = 40;
# 6. bench/tf32_effect.py: one 5-epoch task of the paper stream with tf32 off and on (speed, record drift);
# 7. only with PROBE_BUDGET_S > 0: the paper-scale probe (bench/paper_probe.py), the first tasks of the
#    paper's stream, vanilla vs scheduler, L2, CReLU and Wasserstein; `bench/plot_probe.py` draws them.
# 8. (run right after step 2, whose projection it reads) bench/slots.py: the $SLOTS (default 4) longest jobs
#    at once, each one's speed beside the others against alone, and the scale's makespan on 1..$SLOTS slots;
# Most important first: if the lease ends early, the later steps are the ones lost. STEPS="1 3" runs only
# those steps (default: all). On an H100 (2026-11-27) steps 1-6 took 86-93, 124-137, 48-63, 78-95, 82 and
# 27 s (about 8 minutes; KEY_TESTS_ONLY=1: step 1 in 37-50 s); on an H200 (2026-11-27, third session) step 2
# with project_paper's tasks of 3 and 6 epochs took 125 s and step 8 at SLOTS=5 (8 s phases) 108 s. Their
# timeouts add up to 17.5 minutes.
# DEVICE=cpu runs the same steps on the CPU as a try-out of the script (PROJECT_ARGS, BENCH_MODELS and
# TF32_ARGS then shrink them, e.g. PROJECT_ARGS="--jobs 1 --seeds 0 --epochs 1 --set stream.n_images=600 --set measure.every=4",
# BENCH_MODELS="1 3", BENCH_MODELS_MEASURE=3, TF32_ARGS="--epochs 1 --set stream.n_images=2560",
# PROFILE_ARGS="--jobs batch-crelu-long --set stream.n_images=2560", JOB_ARGS="--set stream.n_images=2560",
# SLOTS=2 and SLOTS_ARGS="--seconds 3 --seeds 0 --set stream.n_images=2560 --set measure.every=4").
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
STEPS=" ${STEPS:-1 2 3 4 5 6 7 8} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

stamp "environment"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"

if want 1; then
    stamp "1. equivalence and measurement tests on $DEVICE"
    # the tests that gate the paper scale's keys, and the step's and the probe's new arithmetic, first (KEY_TESTS_ONLY=1: only those), on their own clock, so a slow rest cannot cost
    # their verdicts; -v: a line per test as it ends (a timeout keeps the verdicts of the tests that ran);
    # on CUDA the CPU stand-in of the graph (same_storages) is left out, the real graph test runs instead
    KEY_TESTS="cuda_graph_step_equals_the_eager_step or fused_adam_equals_single_runs or decision_graph_gives_the_eager_records or decision_graphs_problems_outlive or steps_wasserstein_gradient_is_autograds or decision_step_graph_equals_the_eager_step or probes_products_are_autograds"
    SKIP=$([ "$DEVICE" = cuda ] && echo " and not same_storages")
    pytest_on() { TRAINABILITY_TEST_DEVICE=$DEVICE timeout "$1" $PY -m pytest -o addopts= -v -rfEs -p no:cacheprovider "${@:2}"; }
    pytest_on 150 tests/test_batched.py -k "$KEY_TESTS" 2>&1 | tee "$OUT/tests.log" | grep -v " PASSED" | tail -12
    [ -n "${KEY_TESTS_ONLY:-}" ] || pytest_on 120 tests/test_batched.py tests/test_measure.py \
        "tests/test_train.py::test_resume_equals_uninterrupted" -k "not cli and not paper_scale and not ($KEY_TESTS)$SKIP" \
        2>&1 | tee -a "$OUT/tests.log" | grep -v " PASSED" | tail -25
fi

# each speed-up key on for the timings below where its test passed in step 1, off where it failed (without
# step 1: params.yaml's paper scale as it stands)
KEYS=""
if want 1; then
    passed() { [ "$(grep -cE "test_($1).* PASSED" "$OUT/tests.log")" = "$2" ]; }
    for k in "cuda_graph cuda_graph_step_equals_the_eager_step 1" "fused_adam fused_adam_equals_single_runs 1" \
             "decision_graph decision_graph_gives_the_eager_records|the_decision_graphs_problems_outlive 3" \
             "decision_step_graph decision_step_graph_equals_the_eager_step 1"; do
        set -- $k
        if passed "$2" "$3"; then KEYS="$KEYS --set $1=true"; else KEYS="$KEYS --set $1=false"; fi
    done
fi

if want 2; then
    stamp "2. the whole paper scale, projected from each job's measured cost (${KEYS:-the keys of params.yaml})"
    timeout 240 $PY bench/project_paper.py --device "$DEVICE" --out "$OUT/projection.json" $KEYS ${PROJECT_ARGS:-} \
        2>&1 | grep --line-buffered -v "^task" | tee "$OUT/projection.log"
fi

if want 8; then   # (numbered after the others, run here: it reads step 2's projection)
    stamp "8. jobs at once on the one device: each one's speed beside the others, the makespan on 1-${SLOTS:-4} slots"
    PROJ=$([ -e "$OUT/projection.json" ] && echo "--projection $OUT/projection.json")
    timeout 170 $PY bench/slots.py --device "$DEVICE" --slots "${SLOTS:-4}" $PROJ --out "$OUT/slots.json" \
        $KEYS ${SLOTS_ARGS:-} 2>&1 | grep -v "^W[0-9]" | tee "$OUT/slots.log"
fi

if want 3; then
    stamp "3. where a job's time goes: plain step, decision phases, Wasserstein, HVP rounds as a graph (${KEYS:-the keys of params.yaml})"
    timeout 150 $PY bench/decision_profile.py --device "$DEVICE" --out "$OUT/decision_profile.json" \
        $KEYS ${PROFILE_ARGS:-} 2>&1 | grep -v "^W[0-9]" | tee "$OUT/decision_profile.log"
fi

if want 4; then
    stamp "4. the first two tasks of crelu-short's runs (the first phase's shortest tasks; batched, the paper's configs)"
    rm -rf results/paper/runs/crelu-short
    timeout 150 $PY -m trainability.batched --scale paper --runs crelu-short --fresh --no-progress \
        --set n_tasks=2 --set device="$DEVICE" --set wandb.mode=disabled $KEYS ${JOB_ARGS:-} 2>&1 \
        | grep -v "^W[0-9]" | tee "$OUT/whole_job.log"
    $PY -c "import json, glob
for f in sorted(glob.glob('results/paper/runs/crelu-short/seed*/record.json')):
    r = json.load(open(f)); print(f, r['status'], 'wall s per task', [round(t['wall_s'], 1) for t in r['tasks']],
                                  'steps', [t['steps'] for t in r['tasks']])" 2>&1 | tee -a "$OUT/whole_job.log"
fi

if want 5; then
    stamp "5. batched vs one at a time; the batched step as a CUDA graph, with Adam compiled, and both"
    GRAPH=$([ "$DEVICE" = cuda ] && echo --graph)
    timeout 80 $PY bench/bench_batched.py --device "$DEVICE" --models ${BENCH_MODELS:-1 93} --steps 100 --rounds 2 \
        $GRAPH --fused 2>&1 | grep -v "^W[0-9]" | tee "$OUT/bench.log"
    timeout 55 $PY bench/bench_batched.py --device "$DEVICE" --models ${BENCH_MODELS_MEASURE:-93} --steps 120 --rounds 2 \
        --measure $GRAPH --fused 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/bench.log"
fi

if want 6; then
    stamp "6. tf32: speed and the records, one short task of the paper stream"
    timeout 40 $PY bench/tf32_effect.py --device "$DEVICE" --epochs 5 ${TF32_ARGS:-} 2>&1 | tee "$OUT/tf32.log"
fi

if want 7 && [ "$BUDGET" -gt 0 ]; then
    stamp "7. paper-scale probe"
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
