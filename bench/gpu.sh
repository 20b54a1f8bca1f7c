#!/usr/bin/env bash
# GPU checks and benchmark for a lent GPU machine, in one call.
#
# Here (a machine with Rust, no GPU needed):
#   bench/gpu.sh prepare        # CUDA build of site-agent and the CUDA test binaries -> .device/
# There (no Rust; python3 with torch and NVIDIA's CUDA libraries), through the device tool:
#   run(command="bash bench/gpu.sh", carry=[".device"], timeout_s=540)
#
# There it prints the GPU and driver, then (each step under its own time limit, the whole
# under 8 minutes):
#   1. agreement: the `cuda` tests (cuDNN convolutions, batch norm, loss vs the CPU ops on random
#      shapes, relative L2 <= 1e-4 in fp32; a tiny training run's loss curve on GPU vs CPU; the
#      frozen-prefix cache on the device and spilled), with their measured errors;
#   2. `site-agent bench --device cuda` for `small` and `resnet103` at 256x256, batch 16, in
#      strict fp32 and with FEDTUNE_TF32=1;
#   3. the PyTorch reference (bench/pytorch/bench.py) on the same GPU in the same call: fp32 with
#      TF32 off, TF32, and bf16 autocast;
#   4. one table: images/s of each and the ratios fedtune / PyTorch, including the issue's two
#      goals (full training vs PyTorch fp32; the cached tail vs PyTorch's tail that recomputes
#      the frozen backbone).
# Everything it prints is what it measured there; nothing is filled in.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fedtune-gpu}
mkdir -p "$OUT"

if [ "${1:-}" = prepare ]; then
  set -e
  cargo fetch -q
  # shellcheck source=bench/cuda-env.sh
  source bench/cuda-env.sh
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
  started=$(date +%s)
  cargo build --release --features cuda -p site-agent
  tests=$(cargo test --release --features cuda -p site-agent --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "it":
        print(m["package_id"].split("#")[0].rsplit("/", 1)[-1], m["executable"])')
  # The device tool carries at most 64 MiB: binaries without debug info, compressed (the
  # embedded PTX of candle's kernels compresses about sevenfold).
  stage=$(mktemp -d)
  cp "$CARGO_TARGET_DIR/release/site-agent" "$stage/site-agent"
  while read -r pkg exe; do cp "$exe" "$stage/test-${pkg}"; done <<<"$tests"
  strip "$stage"/*
  rm -rf .device && mkdir -p .device
  tar -C "$stage" -cf - . | xz -6 -T2 >.device/bin.tar.xz
  rm -rf "$stage"
  echo "built in $(($(date +%s) - started)) s:"
  ls -la .device
  exit 0
fi

[ -f .device/bin.tar.xz ] || { echo "no .device/bin.tar.xz: run 'bench/gpu.sh prepare' here first and carry .device" >&2; exit 2; }
BIN=$OUT/bin
python3 -c "import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall(sys.argv[2], filter=\"data\")" .device/bin.tar.xz "$BIN"
chmod +x "$BIN"/*
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU visible" >&2; exit 2; }
nvidia-smi | grep -o 'CUDA Version: [0-9.]*' || true
NVL=$(python3 -c 'import glob,os,site;print(":".join(sorted({os.path.realpath(d) for p in site.getsitepackages() for d in glob.glob(p+"/nvidia/*/lib")})))')
export LD_LIBRARY_PATH=$NVL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -c 'import torch; print("pytorch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
echo "date $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cpus"

echo "== 1. agreement with the CPU (cuda tests)"
for t in "$BIN"/test-*; do
  timeout 150 "$t" cuda:: --nocapture --test-threads 1 2>&1 | grep -E "^test |relative L2|losses|skipped|panicked|result:" | tee -a "$OUT/agreement.txt"
done

bench() { # NAME CONFIG STEPS [ENV...]
  local name=$1 cfg=$2 steps=$3; shift 3
  env "$@" timeout 150 "$BIN/site-agent" -q bench --device cuda --config "$cfg" --size 256 \
    --batch 16 --steps "$steps" --repeat 2 --json >"$OUT/$name.json" 2>"$OUT/$name.err" ||
    echo "fedtune $name failed or timed out: $(tail -n 3 "$OUT/$name.err")"
}
torchbench() { # NAME CONFIG STEPS PRECISION PARAMS
  timeout 150 python3 bench/pytorch/bench.py --device cuda --config "$2" --size 256 --batch 16 \
    --steps "$3" --repeat 2 --precision "$4" ${5:+--expect-params "$5"} --json \
    >"$OUT/$1.json" 2>"$OUT/$1.err" || echo "pytorch $1 failed or timed out: $(tail -n 3 "$OUT/$1.err")"
}
params() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["parameters"])' "$1" 2>/dev/null; }

echo "== 2. fedtune (site-agent bench --device cuda)"
bench small-fp32 small 8
bench small-tf32 small 8 FEDTUNE_TF32=1
bench resnet103-fp32 resnet103 4
bench resnet103-tf32 resnet103 4 FEDTUNE_TF32=1
echo "== 3. PyTorch"
for cfg in small resnet103; do
  steps=8; [ $cfg = resnet103 ] && steps=4
  p=$(params "$OUT/$cfg-fp32.json")
  for prec in fp32 tf32 bf16; do torchbench "torch-$cfg-$prec" $cfg $steps $prec "$p"; done
done

echo "== 4. table (images/s; ratio = fedtune / PyTorch in the same precision)"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except Exception:
        return None
rows = [("full_train_images_per_s", "full training"),
        ("tail_recompute_images_per_s", "tail, prefix recomputed"),
        ("tail_cached_images_per_s", "tail, frozen-prefix cache"),
        ("eval_slices_per_s", "evaluation (slices/s)")]
for cfg in ["small", "resnet103"]:
    ours = {p: load(f"{cfg}-{p}") for p in ["fp32", "tf32"]}
    theirs = {p: load(f"torch-{cfg}-{p}") for p in ["fp32", "tf32", "bf16"]}
    any_ = next((r for r in list(ours.values()) + list(theirs.values()) if r), None)
    if not any_:
        print(f"{cfg}: nothing measured"); continue
    print(f"\n{cfg} at {any_['size']}x{any_['size']}, batch {any_['batch']}, {any_['layers']} layers, "
          f"{any_['trainable_layers']} trained in tail runs; device {(ours['fp32'] or {}).get('device', '?')}")
    print(f"{'figure':28} {'fedtune fp32':>12} {'torch fp32':>11} {'ratio':>6} {'fedtune tf32':>12} "
          f"{'torch tf32':>11} {'ratio':>6} {'torch bf16':>11}")
    f = lambda r, k: r[k] if r else float("nan")
    for key, name in rows:
        a, b = f(ours["fp32"], key), f(theirs["fp32"], key)
        c, d = f(ours["tf32"], key), f(theirs["tf32"], key)
        e = f(theirs["bf16"], key)
        print(f"{name:28} {a:12.1f} {b:11.1f} {a / b:6.2f} {c:12.1f} {d:11.1f} {c / d:6.2f} {e:11.1f}")
    g = lambda r: (r or {}).get("peak_device_mib")
    print(f"{'peak GPU memory MiB':28} {g(ours['fp32']) or float('nan'):12.0f} {g(theirs['fp32']) or float('nan'):11.0f}"
          "   (fedtune: in use at step ends per the driver; torch: max_memory_allocated)")
    a, b = f(ours["fp32"], "full_train_images_per_s"), f(theirs["fp32"], "full_train_images_per_s")
    print(f"goal, full training >= 1.0x PyTorch fp32: {a / b:.2f}x")
    a, b = f(ours["fp32"], "tail_cached_images_per_s"), f(theirs["fp32"], "tail_recompute_images_per_s")
    print(f"goal, cached tail >= 3x PyTorch's recomputing tail (fp32): {a / b:.2f}x")
PY
