"""Several clients at once write small unaligned pieces that share blocks, many requests in
flight each; afterwards every byte must be there. Exercises the block locks of cow and cache
across event loops.

usage: filters_overlay_concurrent.py URI [CLIENTS]
"""

import os
import sys

import nbd

from harness import done, expect, handle

uri = sys.argv[1]
clients = int(sys.argv[2]) if len(sys.argv) > 2 else 4
hs = []
for _ in range(clients):
    h = handle()
    h.connect_uri(uri)
    hs.append(h)
size = hs[0].get_size()
model = bytearray(hs[0].pread(size, 0))

# Client j writes 700 bytes at k * 3000 + j * 700 for its k: pieces of different clients are
# disjoint but share 4K..64K blocks, so block-granular read-modify-write must not lose any.
STRIDE = 700 * clients + 200
pending = []
for k in range(size // STRIDE - 1):
    for j, h in enumerate(hs):
        off = k * STRIDE + j * 700
        data = os.urandom(700)
        model[off:off + 700] = data
        pending.append(h.aio_pwrite(data, off))
    if k % 32 == 31:
        for h in hs:
            while h.aio_in_flight() > 0:
                h.poll(-1)
for h in hs:
    while h.aio_in_flight() > 0:
        h.poll(-1)
for h in hs:
    h.flush()
for j, h in enumerate(hs):
    expect(h.pread(size, 0) == model, "client %d sees different contents" % j)
for h in hs[1:]:
    h.shutdown()
done(hs[0])
