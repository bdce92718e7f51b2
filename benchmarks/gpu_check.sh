#!/usr/bin/env bash
# The GPU path, in one go: on a machine with an NVIDIA GPU and TensorFlow that sees it,
# run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # about 6-8 minutes on an H100/H200-class GPU
#
# Steps (each under its own time limit, so the whole stays within 8 minutes; a step
# that fails is reported and the next one runs; the exit status is non-zero if any
# failed):
#   0. the environment: nvidia-smi, TensorFlow's version and the GPUs it sees (none: stop).
#   1. device placement: a minibatch fit of a random-intercept logistic GLMM (SparseAdam's
#      natural-gradient steps) and of a GLMM with a network (NaturalGradient) with
#      TensorFlow's placement log on; every variable (posterior tables, network,
#      optimizer slots) must live on the GPU and every compute op of the training
#      step (gathers, scatters, unique, segment sums, matmuls, the quadrature) must be
#      placed there: a silent fallback to the CPU fails the check and lists the ops.
#      Also the step time against the same fit pinned to the CPU.
#   2. the test suite's GPU tests (tests/test_gpu.py).
#   3. the 10M-row benchmark on the GPU (benchmarks/bench_scale.py: 10M rows, 1M users,
#      100k Zipf items, logistic) in minibatches (--batch 65536): rows/s, epochs, estimates.
#      Target on an H100/H200: at least 50M rows/s. Then the default full-batch coordinate
#      ascent (XLA passes) on the GPU: seconds and sds against the truth.
#   4. the deep benchmark on InstEval (benchmarks/bench_deep.py, 5 folds: embedding,
#      one-hot and keras_glmm).
#   5. with the time left, the 10M-row model again in batches of 524,288 rows.
# Logs and a summary go to $OUT (default benchmarks/gpu_check_out/); nothing is appended
# to benchmarks/RESULTS.md (copy the numbers there by hand, with the GPU named).
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-benchmarks/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1} PYTHONPATH=${PYTHONPATH:-}:$PWD
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
START=$(date +%s)

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s)" | tee -a "$SUMMARY"
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "--- $name: exit $rc, $(( $(date +%s) - t0 )) s" | tee -a "$SUMMARY"
    [ $rc -eq 0 ] || FAILED=1
    return $rc
}

# 0. The environment.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY" || true
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import tensorflow as tf, keras
gpus = tf.config.list_physical_devices("GPU")
print(f"tensorflow {tf.__version__}, keras {keras.__version__}, built with CUDA: {tf.test.is_built_with_cuda()}, GPUs: {gpus}")
raise SystemExit(0 if gpus else 1)
EOF
then
    echo "TensorFlow sees no GPU: nothing to check (install tensorflow[and-cuda])." | tee -a "$SUMMARY"
    exit 2
fi
nvidia-smi dmon -s u -d 2 > "$OUT/gpu_utilization.log" 2>&1 &
DMON=$!
trap 'kill $DMON 2>/dev/null' EXIT

# 1. Device placement: nothing of the training step silently on the CPU.
cat > "$OUT/placement.py" <<'EOF'
import os, re, sys, time
import numpy as np
import keras, tensorflow as tf
import keras_glmm as kg

# Compute ops of a training step that must run on the GPU: the tables' gathers and
# scatters, the natural steps' unique/segment sums, the network's matmuls and the
# elementwise float math of the ELBO. (Elementwise ops that may act on int32 shapes,
# which TensorFlow keeps on the host, are left out; the input pipeline is on the host.)
HEAVY = re.compile(r"^(ResourceGather|ResourceScatter\w*|Unique\w*|UnsortedSegmentSum|MatMul|BatchMatMul\w*|"
                   r"Softplus|Sigmoid|Exp|Log1p|Square|Rsqrt|Sqrt)$")

def fit_logistic(device, rows=1_000_000, levels=200_000):
    rng = np.random.default_rng(0)
    g = rng.integers(0, levels, rows)
    x = np.stack([np.ones(rows), rng.normal(size=rows)], 1).astype("float32")
    b = rng.normal(0, 0.8, levels)
    y = rng.binomial(1, 1 / (1 + np.exp(-(0.3 * x[:, 1] - 0.5 + b[g])))).astype("float32")
    with tf.device(device):
        model = kg.GLMM(random_effects=[kg.RandomEffects(levels, name="g")], family="binomial",
                        posterior="mean_field")
        start = time.perf_counter()
        model.fit({"x": x, "g": g}, y, batch_size=65536, epochs=3)
        seconds = time.perf_counter() - start
    return model, seconds

def fit_network(device, rows=200_000, levels=20_000):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 3)).astype("float32")
    g = rng.integers(0, levels, rows)
    y = (np.sin(x[:, 0]) + x[:, 1] * x[:, 2] + rng.normal(0, 1, levels)[g] + rng.normal(0, 1, rows)).astype("float32")
    with tf.device(device):
        inputs = keras.Input((3,), name="x")
        h = keras.layers.Dense(64, activation="relu")(keras.layers.Dense(64, activation="relu")(inputs))
        net = keras.Model(inputs, keras.layers.Dense(1)(h))
        model = kg.GLMM(fixed_effects=net, random_effects=[kg.RandomEffects(levels, name="g")])
        start = time.perf_counter()
        model.fit({"x": x, "g": g}, y, batch_size=8192, epochs=3)
        seconds = time.perf_counter() - start
    return model, seconds

if sys.argv[1:] == ["log"]:
    # In a process of its own: the placer logs only when this is on from the start.
    tf.debugging.set_log_device_placement(True)
    fit_network("/GPU:0", rows=20_000, levels=2_000)
    fit_logistic("/GPU:0", rows=100_000, levels=20_000)
    raise SystemExit(0)

failures = []
for name, fit in (("logistic, SparseAdam natural steps", fit_logistic), ("network, NaturalGradient", fit_network)):
    model, gpu_seconds = fit("/GPU:0")
    variables = list(model.variables) + list(model.optimizer.variables)
    off = [v.path for v in variables if "GPU" not in v.value.device]
    if off:
        failures.append(f"{name}: variables not on the GPU: {off[:10]}")
    _, cpu_seconds = fit("/CPU:0")
    print(f"{name}: 3 epochs on the GPU {gpu_seconds:.2f} s, pinned to the CPU {cpu_seconds:.2f} s "
          f"({cpu_seconds / gpu_seconds:.1f}x); variables on the GPU: {len(variables) - len(off)}/{len(variables)}")

# The placement log of the traced training steps: heavy ops on the CPU are a fallback.
import subprocess
log_path = os.environ.get("PLACEMENT_LOG", "placement_ops.log")
with open(log_path, "w") as log:
    subprocess.run([sys.executable, __file__, "log"], stdout=log, stderr=subprocess.STDOUT,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}, check=False)
on_cpu, on_gpu = {}, 0
# Lines `node name: (OpType): /job:.../device:CPU:0`; the training step's nodes are inside
# Keras's traced step (`StatefulPartitionedCall/`), the input pipeline's are not.
for line in open(log_path, errors="replace"):
    m = re.search(r"(\S+): \((\w+)\): /job:\S*device:(CPU|GPU)", line)
    if not m or "StatefulPartitionedCall/" not in m.group(1) or not HEAVY.match(m.group(2)):
        continue
    if m.group(3) == "GPU":
        on_gpu += 1
    else:
        on_cpu[m.group(2)] = on_cpu.get(m.group(2), 0) + 1
print(f"heavy ops of the training step: {on_gpu} placed on the GPU")
if not on_gpu:
    failures.append("no op of the training step was seen placed on the GPU (placement log empty?)")
print("heavy ops of the training step placed on the CPU:", on_cpu or "none")
if on_cpu:
    failures.append(f"ops of the training step on the CPU: {on_cpu}")
print("\n".join(failures) or "placement: OK")
raise SystemExit(1 if failures else 0)
EOF
PLACEMENT_LOG="$OUT/placement_ops.log" TF_CPP_MIN_LOG_LEVEL=0 step placement 90 "$PY" "$OUT/placement.py"

# 2. The test suite's GPU tests.
step gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py

# 3. The 10M-row benchmark on the GPU: minibatch stochastic VI (65,536 rows a batch), then
#    the default full-batch coordinate ascent (its passes are XLA-compiled: on the GPU too).
step scale_10M 120 "$PY" benchmarks/bench_scale.py --batch 65536 --no-record
grep -E "rows/s|epochs|sd |Intercept" "$OUT/scale_10M.log" | tail -n 12 >> "$SUMMARY"
step scale_10M_coordinate_ascent 90 "$PY" benchmarks/bench_scale.py --no-record
grep -E "rows/s|epochs|sd |Intercept|construction" "$OUT/scale_10M_coordinate_ascent.log" | tail -n 12 >> "$SUMMARY"

# 4. The deep benchmark on InstEval.
step deep_insteval 160 "$PY" benchmarks/bench_deep.py --datasets insteval --folds 5 \
    --methods one-hot,embedding,keras_glmm --no-lme4 --no-record
grep -E "^\| InstEval|^- InstEval" "$OUT/deep_insteval.log" >> "$SUMMARY"

# 5. With the time left: the 10M-row model in batches of 524,288 rows (fewer, larger steps:
#    the per-step overhead of small kernels is what bounds rows/s on a GPU).
LEFT=$(( 470 - ($(date +%s) - START) ))
if [ $LEFT -ge 45 ]; then
    step scale_10M_big_batches $LEFT "$PY" benchmarks/bench_scale.py --batch 524288 --no-record
    grep -E "rows/s|epochs|sd |Intercept" "$OUT/scale_10M_big_batches.log" | tail -n 12 >> "$SUMMARY"
fi

echo "=== total $(( $(date +%s) - START )) s; GPU utilization samples in $OUT/gpu_utilization.log" | tee -a "$SUMMARY"
[ $FAILED -eq 0 ] && echo "gpu_check: all steps passed" | tee -a "$SUMMARY" || echo "gpu_check: some steps FAILED" | tee -a "$SUMMARY"
exit $FAILED
