#!/usr/bin/env bash
# Run ../shared/bench/compare.sh with blocksmith added next to the peers, and write the
# markdown report to bench/results/compare-<date>.md (plus the raw data directory).
#
#   bench/compare.sh                         # a, b, c, e, f, g against nbdkit-memory, 3 reps
#   bench/compare.sh --pin on --workloads a,e  # server on CPU 0, client on CPU 1
#   bench/compare.sh --workloads a,c --reps 5
#   bench/compare.sh --quick                 # smoke run
#
# Added servers (ratios are against nbdkit-memory unless --ref is given):
#   blocksmith         memory backend, prefilled like nbdkit-memory (the harness copies {disk})
#   blocksmith-file    file backend on {disk} (page cache), for the file-plugin comparison
#   nbdkit-file        nbdkit's file plugin on {disk}
#   nbdkit-memory-t1   nbdkit --threads 1, the peer the many-clients targets name
# Extra arguments go to compare.sh and override these defaults. tuning.md lists the other runs
# behind its tables (unallocated writes, filters, file on ext4, --threads and --io variants).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
shared=${BLOCKSMITH_SHARED:-$top/../shared}
[[ -x $shared/bench/compare.sh ]] || { echo "compare.sh not found under $shared/bench" >&2; exit 1; }

cargo build --release --manifest-path "$top/Cargo.toml" >&2
bin=$top/target/release/blocksmith
stamp=$(date -u +%Y%m%d-%H%M%S)
out=$here/results/compare-$stamp
mkdir -p "$here/results"

"$shared/bench/compare.sh" \
    --peers nbdkit-memory \
    --server "blocksmith=$bin -f -p {port} -i 127.0.0.1 memory {size}" \
    --server "blocksmith-file=$bin -f -p {port} -i 127.0.0.1 file {disk}" \
    --server "nbdkit-file=nbdkit -f --exit-with-parent -p {port} -i 127.0.0.1 file {disk}" \
    --server "nbdkit-memory-t1=nbdkit -f --exit-with-parent --threads 1 -p {port} -i 127.0.0.1 memory {size}" \
    --prefill nbdkit-memory,blocksmith,nbdkit-memory-t1 \
    --workloads a,b,c,e,f,g \
    --out "$out" \
    "$@" | tee "$out.md"
echo "report: $out.md (raw data in $out/)" >&2
