#!/usr/bin/env bash
# Count the server's calls to malloc and realloc per request under workload e (1000 clients,
# 2 requests in flight each, 4K random reads from a prefilled memory disk), with uprobes on
# glibc. Needs root (perf probe) and nbdstorm (built from ../shared/bench/nbdstorm.c).
#
#   bench/mallocs.sh target/release/blocksmith
#   bench/mallocs.sh /tmp/old-blocksmith
#
# The functional guarantee (no allocation per request in steady state) is tested by
# backends/tests/steady_state_allocations.rs; this shows the same under many clients.
set -euo pipefail
[[ $# -eq 1 ]] || { sed -n '2,9p' "$0" >&2; exit 2; }
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
shared=${BLOCKSMITH_SHARED:-$here/../../shared}
storm=${NBDSTORM:-/tmp/nbdstorm}
[[ -x $storm ]] || gcc -O2 -o "$storm" "$shared/bench/nbdstorm.c" -lnbd
libc=$(ldd "$bin" | awk '/libc.so.6/ {print $3}')
perf probe -q -x "$libc" -a malloc -a realloc 2>/dev/null || true   # already there is fine

port=10907
ulimit -n 20000
work=$(mktemp -d)
setsid "$bin" -f -p $port -i 127.0.0.1 memory 1G >/dev/null 2>&1 &
pid=$!
trap 'kill -- -$pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
sleep 1
head -c 1G /dev/urandom > "$work/disk"
nbdcopy "$work/disk" nbd://127.0.0.1:$port/
rm -f "$work/disk"
# Count over 3 s in the middle of the 5 s run.
( sleep 1.5; perf stat -x, -e probe_libc:malloc,probe_libc:realloc -o "$work/perf" -p $pid sleep 3 ) &
counter=$!
"$storm" --uri nbd://127.0.0.1:$port --connections 1000 --ramp 1000 --depth 2 --size 4k \
    --mix read --seconds 5 > "$work/storm.json" 2> "$work/storm.err"
wait $counter
iops=$(tail -1 "$work/storm.json" | jq .iops)
mallocs=$(awk -F, '$3 == "probe_libc:malloc" {print $1}' "$work/perf")
reallocs=$(awk -F, '$3 == "probe_libc:realloc" {print $1}' "$work/perf")
awk -v i="$iops" -v m="$mallocs" -v r="$reallocs" 'BEGIN {
    printf "%d IOPS; per request over 3 s: %.3f mallocs, %.3f reallocs\n", i, m / (i * 3), r / (i * 3) }'
