#!/usr/bin/env bash
# Issue 7's GPU check, in one call on a machine with an NVIDIA GPU, a Python with torch
# and transformers, and no Rust: the binary from scripts/build-cuda travels with the tree.
#
#   here:    scripts/build-cuda                 # last line: the binary's path
#            mkdir -p dist && xz -T2 -c BINARY > dist/magpie.xz   # dist/ is git-ignored
#            (the device tool carries 64 MiB in all: 122 MB of binary is ~43 MB gzipped,
#            less with xz; MAGPIE_CUDA_EXTRA_SASS= builds it without the sm_90 code)
#   device:  bash scripts/device/gpu-check.sh   # carry: dist
#
# What it does (each step logged; a failing step is reported and the rest still run):
#   1. GPU, driver, torch; the CUDA 13 libraries the binary opens (libcublas.so.13,
#      libcurand.so.10), found in the Python environment's nvidia packages and put on
#      LD_LIBRARY_PATH; a PTX cache (CUDA_CACHE_PATH) so kernels compile once.
#   2. `magpie --device auto status`: the GPU must be picked.
#   3. Parity on the committed fixtures: CLIP image and text embeddings on the GPU (f16)
#      against the CPU path (f32), cosine ≥ 0.999; BLIP-2 greedy captions GPU vs CPU.
#   4. Full-size random weights made here with the local torch (CLIP ViT-B/32 and ViT-L/14,
#      BLIP-2 OPT-2.7b), then `magpie bench` on the GPU against transformers on the same
#      GPU, same weights and precision (scripts/bench/peer_*.py --device cuda): images/s,
#      text ms, BLIP-2 vision s, ms per token, caption s (alone and in batches), peak GPU
#      memory (nvidia-smi sampled every 200 ms for magpie, torch's own count for PyTorch).
#   5. A summary with the ratios, in $OUT/summary.txt (also printed).
#
# Knobs: PYTHON (default python3), MAGPIE_BIN (default dist/magpie[.gz]), BENCH_DIR
# (default /tmp/magpie-bench), SECONDS_PER (seconds per measurement, default 3),
# SKIP_BLIP2=1 (CLIP only; BLIP-2's 3.9 B random weights take a few minutes to make).
set -uo pipefail

OUT=${OUT:-/tmp/magpie-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BENCH=${BENCH_DIR:-/tmp/magpie-bench}
SECS=${SECONDS_PER:-3}
BIN=${MAGPIE_BIN:-dist/magpie}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$BENCH"
log() { printf '\n== %s\n' "$*" | tee -a "$OUT/log.txt" >&2; }
step() { # step NAME CMD...: runs CMD, logs its output, never stops the script
    local name=$1
    shift
    log "$name"
    "$@" 2>&1 | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || echo "FAILED ($rc): $name" | tee -a "$OUT/log.txt" "$OUT/failures.txt" >&2
    return 0
}

# --- 1. environment ---------------------------------------------------------------------
if [[ ! -x $BIN && -f $BIN.xz ]]; then
    xz -dc "$BIN.xz" >"$BIN" && chmod +x "$BIN"
elif [[ ! -x $BIN && -f $BIN.gz ]]; then
    gunzip -c "$BIN.gz" >"$BIN" && chmod +x "$BIN"
fi
[[ -x $BIN ]] || { echo "no magpie binary at $BIN (build it with scripts/build-cuda, carry dist/)" >&2; exit 2; }
step "gpu" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
LIBS=/tmp/magpie-cuda-libs
mkdir -p "$LIBS"
for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
    f=$("$PY" - "$so" <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
hits = [h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "**", sys.argv[1]), recursive=True)]
print(hits[0] if hits else "")
EOF
)
    if [[ -n $f ]]; then ln -sf "$f" "$LIBS/$so"; else echo "warning: $so not found in $PY's site-packages" >&2; fi
done
export LD_LIBRARY_PATH=$LIBS:${LD_LIBRARY_PATH:-}
export CUDA_CACHE_PATH=/tmp/magpie-cuda-cache CUDA_CACHE_MAXSIZE=2147483648 CUDA_MODULE_LOADING=LAZY
step "versions" bash -c "'$BIN' --version; '$PY' -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name(0))'"

# --- 2. device choice -------------------------------------------------------------------
DATA=$(mktemp -d)
step "status --device auto" "$BIN" --data-dir "$DATA" --device auto status --json
"$BIN" --data-dir "$DATA" --device auto status | grep -q "device *Cuda" \
    || echo "FAILED: --device auto did not pick the GPU" | tee -a "$OUT/failures.txt"

# --- 3. parity on the fixtures ----------------------------------------------------------
parity() {
    local m=$1 photo=tests/fixtures/photos/chelsea.png
    for dev in cpu cuda; do
        "$BIN" --data-dir "$DATA" --device $dev --model tests/fixtures/clip/$m --precision f32 embed --image $photo --json >"$BENCH/$m-img-$dev.json" || return 1
        "$BIN" --data-dir "$DATA" --device $dev --model tests/fixtures/clip/$m --precision f32 embed --text "a cat on a sofa" --json >"$BENCH/$m-txt-$dev.json" || return 1
    done
    "$PY" - "$BENCH" "$m" <<'EOF'
import json, sys
d, m = sys.argv[1], sys.argv[2]
for kind in ("img", "txt"):
    a = json.load(open(f"{d}/{m}-{kind}-cpu.json"))["vector"]
    b = json.load(open(f"{d}/{m}-{kind}-cuda.json"))["vector"]
    cos = sum(x * y for x, y in zip(a, b))
    print(f"{m} {kind}: cosine GPU f16 vs CPU f32 {cos:.6f}")
    assert cos >= 0.999, "below 0.999"
EOF
}
step "CLIP parity tiny-a" parity tiny-a
step "CLIP parity tiny-b" parity tiny-b
captions() {
    local m=$1
    for dev in cpu cuda; do
        "$BIN" --data-dir "$DATA" --device $dev --caption-model tests/fixtures/blip2/$m --caption-precision f32 caption tests/fixtures/photos/chelsea.png --json >"$BENCH/$m-cap-$dev.json" || return 1
    done
    "$BIN" --data-dir "$DATA" --device cuda --caption-model tests/fixtures/blip2/$m --caption-precision f16 caption tests/fixtures/photos/chelsea.png --json >"$BENCH/$m-cap-cuda16.json" || return 1
    "$PY" - "$BENCH" "$m" <<'EOF'
import json, sys
d, m = sys.argv[1], sys.argv[2]
c = {k: json.load(open(f"{d}/{m}-cap-{k}.json")) for k in ("cpu", "cuda", "cuda16")}
for k, v in c.items():
    print(f"{m} {k}: {v}")
print("equal (f32):", c["cpu"] == c["cuda"], " equal (f16):", c["cpu"] == c["cuda16"])
EOF
}
step "BLIP-2 captions tiny-a" captions tiny-a
step "BLIP-2 captions tiny-b" captions tiny-b

# --- 4. speed on full-size random weights -----------------------------------------------
gpu_peak() { # gpu_peak FILE CMD...: runs CMD, writes nvidia-smi's peak used MiB to FILE
    local file=$1
    shift
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) >"$file.samples" &
    local sampler=$!
    "$@"
    local rc=$?
    kill $sampler 2>/dev/null
    sort -n "$file.samples" | tail -1 >"$file"
    return $rc
}
make_clip() { [[ -f $BENCH/$1/model.safetensors ]] || "$PY" scripts/bench/make_clip_b32.py "$BENCH/$1" --no-onnx ${2:-}; }
step "make ViT-B/32" make_clip clip-b32
step "make ViT-L/14" make_clip clip-l14 --large
for m in clip-b32 clip-l14; do
    step "magpie $m" gpu_peak "$OUT/$m.magpie.mib" bash -c "'$BIN' --data-dir '$DATA' --device cuda --model '$BENCH/$m' bench --batch 64 --seconds $SECS --json >'$OUT/$m.magpie.json'"
    step "torch $m" bash -c "'$PY' scripts/bench/peer_clip.py '$BENCH/$m' --device cuda --dtype f16 --batches 1,64 --min-time $SECS >'$OUT/$m.torch.json'"
done
if [[ ${SKIP_BLIP2:-0} != 1 ]]; then
    step "make BLIP-2 OPT-2.7b (full size)" bash -c "[[ -f '$BENCH/blip2/config.json' ]] || '$PY' scripts/bench/make_blip2_opt27b.py '$BENCH/blip2' --layers 0"
    step "magpie BLIP-2" gpu_peak "$OUT/blip2.magpie.mib" bash -c "'$BIN' --data-dir '$DATA' --device cuda --model '$BENCH/clip-b32' --caption-model '$BENCH/blip2' --caption-precision f16 bench --captions --batch 8 --seconds $SECS --json >'$OUT/blip2.magpie.json'"
    step "torch BLIP-2" bash -c "'$PY' scripts/bench/peer_blip2.py '$BENCH/blip2' --device cuda --dtype f16 --min-time $SECS >'$OUT/blip2.torch.json'"
fi

# --- 5. summary -------------------------------------------------------------------------
"$PY" scripts/device/summary.py "$OUT" | tee "$OUT/summary.txt"
[[ -s $OUT/failures.txt ]] && { echo "failures:"; cat "$OUT/failures.txt"; }
exit 0
