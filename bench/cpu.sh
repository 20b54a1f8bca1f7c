#!/usr/bin/env bash
# Runs `site-agent bench` and the PyTorch reference on the same machine and threads, and prints
# both with the ratios (fedtune / PyTorch). Needs python3 with torch (pip install torch).
# Each figure is the best of 3 timed epochs after a warm-up epoch, on both sides.
# Usage: bench/cpu.sh [CONFIG BATCH STEPS]...   default: tiny 8 20, small 16 8, resnet103 4 2
# (resnet103 is the paper's depth at 256x256: about 6 minutes for its row on 2 cores).
# REPEAT=N sets the timed epochs per figure (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p site-agent
repeat=${REPEAT:-3}
[ $# -gt 0 ] || set -- tiny 8 20 small 16 8 resnet103 4 2
echo "machine: $(uname -m), $(nproc) cpus ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(date -u +%Y-%m-%d)"
printf '%-7s %5s %-30s %10s %10s %7s\n' config batch figure fedtune pytorch ratio
while [ $# -ge 3 ]; do
  cfg=$1 batch=$2 steps=$3; shift 3
  ours=$(./target/release/site-agent bench --device cpu --config "$cfg" --batch "$batch" --steps "$steps" --repeat "$repeat" --json)
  params=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["parameters"])' "$ours")
  # PyTorch gets the threads fedtune used (one per physical core unless RAYON_NUM_THREADS).
  threads=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["threads"])' "$ours")
  theirs=$(python3 bench/pytorch/bench.py --config "$cfg" --batch "$batch" --steps "$steps" \
    --threads "$threads" --repeat "$repeat" --expect-params "$params" --json)
  python3 - "$cfg" "$batch" "$ours" "$theirs" <<'PY'
import json, sys
cfg, batch, ours, theirs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
for key, name in [("full_train_images_per_s", "full training img/s"),
                  ("tail_recompute_images_per_s", "tail, prefix recomputed img/s"),
                  ("tail_cached_images_per_s", "tail, from cache img/s"),
                  ("eval_slices_per_s", "evaluation slices/s"),
                  ("peak_rss_mib", "peak memory MiB")]:
    a, b = ours[key], theirs[key]
    print(f"{cfg:7} {batch:>5} {name:30} {a:10.4g} {b:10.4g} {a / b:7.2f}")
print(f"{cfg:7} {batch:>5} {'threads (each engine)':30} {ours['threads']:10} {theirs['threads']:10}")
print(f"{cfg:7} {batch:>5} {'cache vs PyTorch recompute':30} {ours['tail_cached_images_per_s']:10.4g} "
      f"{theirs['tail_recompute_images_per_s']:10.4g} "
      f"{ours['tail_cached_images_per_s'] / theirs['tail_recompute_images_per_s']:7.2f}")
PY
done
