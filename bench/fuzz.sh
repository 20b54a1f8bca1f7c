#!/usr/bin/env bash
# Runs the hostile-input property tests (the NIfTI reader, the manifest parser, the weights
# parser, the decoding of every RPC request) for a fixed budget of cases each, and prints the
# executions, the time and the outcome of each. A finding fails its test and proptest prints
# the minimal failing input.
# Usage: bench/fuzz.sh [CASES]   (default 100000 per target; CI runs 64 through cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-100000}
cargo build --release -q -p site-agent -p proto --tests
echo "machine: $(uname -m), $(nproc) cpus, $(date -u +%Y-%m-%dT%H:%MZ), $cases cases per target"
printf '%-52s %10s %7s %s\n' target executions seconds outcome
run() {
  local pkg=$1 test=$2 name=$3
  local start end rc=0
  local tally=/tmp/fedtune-fuzz-tally
  rm -f "$tally"
  start=$(date +%s%N)
  FEDTUNE_FUZZ_CASES=$cases FEDTUNE_FUZZ_TALLY=$tally \
    cargo test --release -q -p "$pkg" --test "$test" -- --exact "$name" \
    >/tmp/fedtune-fuzz.log 2>&1 || rc=$?
  end=$(date +%s%N)
  # Each case that ran appended one byte to the tally.
  local executions=0
  [ -f "$tally" ] && executions=$(stat -c %s "$tally")
  local outcome="no finding"
  [ "$rc" -eq 0 ] || outcome="FINDING (see /tmp/fedtune-fuzz.log)"
  local ms=$(((end - start) / 1000000))
  printf '%-52s %10d %5d.%01d %s\n' "$name" "$executions" $((ms / 1000)) $((ms % 1000 / 100)) "$outcome"
  [ "$rc" -eq 0 ] || cp /tmp/fedtune-fuzz.log "/tmp/fedtune-fuzz-${name//::/-}.log"
}
run site-agent it hostile::nifti_reader_answers_damaged_files
run site-agent it hostile::nifti_reader_answers_arbitrary_bytes
run site-agent it hostile::manifest_parser_answers_damaged_text
run site-agent it hostile::weights_parser_answers_damaged_files
run proto decode requests_decode_arbitrary_bytes_or_refuse
run proto decode requests_decode_damaged_encodings_or_refuse
