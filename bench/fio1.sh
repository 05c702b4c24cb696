#!/usr/bin/env bash
# One fio run against one freshly started memory server, with the server's CPU per request:
# quick A/B comparisons of two builds (interleave several rounds; this machine is noisy).
#
#   bench/fio1.sh BIN RW BS QD SECONDS PREFILL [SERVER ARGS...]
#   bench/fio1.sh target/release/blocksmith randwrite 4k 32 5 0   # writes into empty memory
#   bench/fio1.sh /tmp/old-blocksmith read 1M 8 5 1               # prefilled, 1 MiB reads
#   bench/fio1.sh nbdkit randread 4k 32 5 1                       # nbdkit memory, same run
#
#   bench/fio1.sh target/release/blocksmith randwrite 4k 32 5 0 --io=pool --filter=cow memory 4G
#
# BIN is a blocksmith binary or the word nbdkit; the server serves SERVER ARGS (default
# `memory 4G`; the disk must be at least 4 GiB) on 127.0.0.1:10901. PREFILL=1 writes the whole disk with 1 MiB writes first (untimed). Prints
# IOPS, MB/s, fio's p99 completion latency, and the server's user+system CPU per request
# (from /proc/PID/stat, in µs).
set -euo pipefail
[[ $# -ge 6 ]] || { sed -n '2,16p' "$0" >&2; exit 2; }
bin=$1 rw=$2 bs=$3 qd=$4 secs=$5 prefill=$6
shift 6
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(memory 4G)
port=10901
uri=nbd://127.0.0.1:$port/
if [[ $bin == nbdkit ]]; then
    setsid nbdkit -f -p $port -i 127.0.0.1 "${args[@]}" >/dev/null 2>&1 &
else
    setsid "$bin" -f -p $port -i 127.0.0.1 "${args[@]}" >/dev/null 2>&1 &
fi
pid=$!
trap 'kill -- -$pid 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 50); do nbdinfo --size "$uri" >/dev/null 2>&1 && break; sleep 0.1; done
if [[ $prefill == 1 ]]; then
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=4G \
        --output-format=terse >/dev/null
fi
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
t0=$(ticks)
out=$(fio --name=run --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=4G \
    --runtime="$secs" --time_based --output-format=json)
t1=$(ticks)
dir=read; [[ $rw == *write ]] && dir=write
hz=$(getconf CLK_TCK)
sed -n '/^{/,$p' <<<"$out" | jq -r --arg d "$dir" \
    '.jobs[0][$d] | "\(.iops) \(.bw_bytes / 1e6) \(.clat_ns.percentile["99.000000"] / 1e6)"' |
while read -r iops mbs p99; do
    us=$(echo "($t1 - $t0) * 1000000 / $hz / ($iops * $secs)" | bc -l)
    printf '%-12s %-9s %-4s QD%-3s IOPS %8.0f  MB/s %6.0f  p99 %6.2f ms  CPU/req %6.1f µs\n' \
        "$(basename "$bin")" "$rw" "$bs" "$qd" "$iops" "$mbs" "$p99" "$us"
done
