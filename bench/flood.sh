#!/usr/bin/env bash
# flood: many clients each writing one large request at once, far more than the server's
# --memory-limit holds. Measures whether resident memory stays at the limit plus the documented
# overhead (core/src/limits.rs), and the throughput meanwhile; nbdkit (no limit) for comparison.
#
#   bench/flood.sh                                  # --memory-limit 256M and 1G, then nbdkit
#   bench/flood.sh --limits 64M,256M --connections 200 --size 16M --seconds 5
#   bench/flood.sh --no-nbdkit
#
# Each run starts a fresh server (null backend, so stored data does not count), runs the shared
# load generator nbdstorm
#   nbdstorm --connections N --depth 1 --size S --mix write --ramp 1000 --seconds T
# samples the server's VmRSS and VmHWM from /proc every 50 ms, and prints one markdown row:
# limit, idle RSS, peak RSS (VmHWM), overhead = peak - limit, throughput, and what nbdstorm
# saw. A server whose RSS passes --cap (default 4G) is killed and its row says so: nbdkit has
# no memory bound (one buffer per request in flight: 1000 x 32 MiB = 32 GiB), and on a shared
# machine the kernel's OOM killer would otherwise pick a victim.
#
# Options:
#   --limits L1,L2,...  blocksmith --memory-limit values (default 256M,1G)
#   --connections N     clients (default 1000)      --size S       request size (default 32M)
#   --seconds T         measurement window (default 10)
#   --threads N         blocksmith event loops (default: one per core)
#   --cap SIZE          kill a server whose RSS passes this (default 4G)
#   --no-nbdkit         skip the nbdkit row
#   --bin PATH          blocksmith binary (default target/release/blocksmith)
# Environment: NBDSTORM (path to nbdstorm), BLOCKSMITH_SHARED (the shared bench directory).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
shared=${BLOCKSMITH_SHARED:-$top/../shared}

limits=256M,1G
conns=1000
size=32M
seconds=10
threads=
cap=4G
with_nbdkit=1
bin=$top/target/release/blocksmith
while (($#)); do
    case $1 in
        --limits) limits=$2; shift 2 ;;
        --connections) conns=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --cap) cap=$2; shift 2 ;;
        --no-nbdkit) with_nbdkit=0; shift ;;
        --bin) bin=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "flood.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

[[ -x $bin ]] || { echo "flood.sh: $bin not found: run 'cargo build --release' first" >&2; exit 1; }
if [[ -n ${NBDSTORM:-} ]]; then
    storm=$NBDSTORM
elif [[ -x ${XDG_CACHE_HOME:-$HOME/.cache}/nbd-bench/nbdstorm ]]; then
    storm=${XDG_CACHE_HOME:-$HOME/.cache}/nbd-bench/nbdstorm
else
    storm=/tmp/nbdstorm
    if [[ ! -x $storm ]]; then
        echo "flood.sh: building $storm from $shared/bench/nbdstorm.c" >&2
        gcc -O2 -o "$storm" "$shared/bench/nbdstorm.c" -lnbd
    fi
fi
if ((with_nbdkit)) && ! command -v nbdkit >/dev/null; then
    echo "flood.sh: nbdkit not installed; skipping its row" >&2
    with_nbdkit=0
fi
py=$(command -v python3)

# One descriptor per client on each side, plus a few.
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < conns + 100)); then
    echo "flood.sh: ulimit -n is $(ulimit -n), too low for $conns clients" >&2
    exit 1
fi

bytes() { # 256M -> 268435456
    "$py" -c '
import re, sys
m = re.fullmatch(r"(\d+)([kKmMgGtT]?)(i?[bB])?", sys.argv[1])
if not m: sys.exit("bad size " + sys.argv[1])
print(int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()])' "$1"
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
cap_bytes=$(bytes "$cap")

work=$(mktemp -d "${TMPDIR:-/tmp}/flood.XXXXXX")
srv_pid=
sampler_pid=
cleanup() {
    [[ -n $sampler_pid ]] && kill "$sampler_pid" 2>/dev/null || true
    [[ -n $srv_pid ]] && kill -9 "$srv_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

status_kb() { # PID FIELD -> kB (empty if the process is gone)
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || true
}

# Sample VmRSS/VmHWM every 50 ms; kill the server if it passes the cap.
sample() { # PID OUTFILE
    local pid=$1 out=$2 rss hwm
    while [[ -e /proc/$pid/status ]]; do
        rss=$(status_kb "$pid" VmRSS)
        hwm=$(status_kb "$pid" VmHWM)
        [[ -n $rss && -n $hwm ]] || break
        echo "$rss $hwm" >>"$out"
        if ((rss * 1024 > cap_bytes)); then
            echo capped >>"$out.capped"
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.05
    done
}

# run NAME LIMIT_BYTES|- COMMAND...: one flood against a fresh server; prints its row.
run() {
    local name=$1 limit=$2
    shift 2
    local port log samples storm_out
    port=$(free_port)
    log=$work/$name.log
    samples=$work/$name.rss
    storm_out=$work/$name.json
    : >"$samples"
    "$@" -f -p "$port" -i 127.0.0.1 null 1G 2>"$log" &
    srv_pid=$!
    # Not a job to report on: the sampler may SIGKILL it (waited for by polling, below).
    disown "$srv_pid"
    local deadline=$((SECONDS + 10))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ((SECONDS > deadline)) || ! kill -0 "$srv_pid" 2>/dev/null; then
            echo "flood.sh: $name did not start:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.05
    done
    sleep 0.2
    local idle_kb
    idle_kb=$(status_kb "$srv_pid" VmRSS)
    sample "$srv_pid" "$samples" &
    sampler_pid=$!
    timeout $((seconds + 180)) "$storm" --uri "nbd://127.0.0.1:$port/" --connections "$conns" --depth 1 \
        --size "$size" --mix write --ramp 1000 --seconds "$seconds" >"$storm_out" 2>"$work/$name.storm.err" || true
    local hwm_kb
    hwm_kb=$(status_kb "$srv_pid" VmHWM)
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=
    kill "$srv_pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$srv_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$srv_pid" 2>/dev/null || true
    srv_pid=
    local sampled_hwm
    sampled_hwm=$(awk 'BEGIN { m = 0 } $2 > m { m = $2 } END { print m }' "$samples")
    [[ -n $hwm_kb ]] || hwm_kb=$sampled_hwm
    local peak=$((hwm_kb * 1024)) limit_s over_s peak_s
    peak_s="$(mib "$peak") MiB"
    if [[ -e $samples.capped ]]; then
        peak_s="> $(mib "$cap_bytes") MiB (killed at the cap)"
    fi
    if [[ $limit == - ]]; then
        limit_s="none"
        over_s="—"
    else
        limit_s="$(mib "$limit") MiB"
        over_s="$(mib $((peak - limit))) MiB"
    fi
    local storm_s
    storm_s=$("$py" - "$storm_out" <<'EOF'
import json, sys
try:
    d = json.loads(open(sys.argv[1]).read())
except Exception:
    print("| — | — | nbdstorm gave no result |")
    sys.exit(0)
note = "%d/%d connected, %d dropped, %d errors, fairness %.2f, %d starved" % (
    d["established"], d["connections"], d["dropped"], d["errors"], d["fairness"], d["starved"])
if d.get("first_error"):
    note += ", first error: " + d["first_error"]
print("| %.0f | %d | %s |" % (d["mb_s"], d["requests"], note))
EOF
)
    echo "| $name | $limit_s | $(mib $((idle_kb * 1024))) MiB | $peak_s | $over_s $storm_s"
}

echo "flood: $conns connections x $size writes (depth 1), ${seconds} s window, $(nproc) cores," \
    "$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), $(date -u +%F)"
echo "client: nbdstorm --uri nbd://127.0.0.1:PORT/ --connections $conns --depth 1 --size $size --mix write" \
    "--ramp 1000 --seconds $seconds; servers: blocksmith -f -p PORT -i 127.0.0.1 --memory-limit L" \
    "${threads:+--threads $threads }null 1G, nbdkit -f -p PORT -i 127.0.0.1 null 1G"
echo
echo "| server | --memory-limit | idle RSS | peak RSS (VmHWM) | overhead (peak - limit) | MB/s | writes | nbdstorm |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
IFS=, read -r -a limit_list <<<"$limits"
for l in "${limit_list[@]}"; do
    cmd=("$bin" --memory-limit "$l")
    # The server wants at least twice the largest request (default 64M) in the budget.
    lb=$(bytes "$l")
    ((lb >= 128 << 20)) || cmd+=(--max-request $((lb / 2)))
    [[ -n $threads ]] && cmd+=(--threads "$threads")
    run "blocksmith" "$lb" "${cmd[@]}"
done
if ((with_nbdkit)); then
    run "nbdkit" - nbdkit
fi
