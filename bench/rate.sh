#!/bin/sh
# Measure the rate filter's steady-state bandwidth against its limit.
#
#   cargo build --release && bench/rate.sh            # rate=80M (10 MiB/s), 40 MiB measured
#   RATE=160M MEASURE_MIB=80 bench/rate.sh
#
# The limit is in bits per second with nbdkit's size suffixes (M = 2^20), so 80M is 10 MiB/s.
# Buckets start full with `burstiness` seconds (default 2) of tokens: the client first reads
# that much untimed, then times MEASURE_MIB more, sequentially, in 1 MiB requests. The result
# should be within a few percent of the limit (the test suite never checks speed; this does).
set -eu

BIN=${BLOCKSMITH:-target/release/blocksmith}
RATE=${RATE:-80M}
MEASURE_MIB=${MEASURE_MIB:-40}
KEY=${KEY:-rate}          # or connection-rate
PY=/usr/bin/python3       # the distro Python has the nbd module

script=$(mktemp)
trap 'rm -f "$script"' EXIT
cat > "$script" <<'PYEOF'
import sys, time
import nbd

uri, rate_bits, measure_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
chunk = 1 << 20
size = h.get_size()
burst = int(rate_bits * 2.0 / 8)       # the bucket's initial tokens, in bytes
off = 0
def read(n):
    global off
    for _ in range(n):
        h.pread(chunk, off % (size - chunk))
        off += chunk
read(burst // chunk + 1)               # drain the initial burst, untimed
t0 = time.monotonic()
read(measure_mib)
t = time.monotonic() - t0
got = measure_mib * chunk * 8 / t
print("limit %.2f Mbit/s, measured %.2f Mbit/s over %.1f s: %.1f%% of the limit"
      % (rate_bits / 1e6, got / 1e6, t, 100.0 * got / rate_bits))
h.shutdown()
PYEOF

bits=$("$PY" -c "
s='$RATE'.strip(); m={'':1,'K':1<<10,'M':1<<20,'G':1<<30}
print(int(float(s.rstrip('KMGkmg'))*m[s[-1].upper() if s[-1].isalpha() else '']))")
"$BIN" -U - --filter=rate memory 256M "$KEY=$RATE" \
    --run "$PY $script \"\$uri\" $bits $MEASURE_MIB"
