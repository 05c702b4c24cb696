"""1000 concurrent aio reads through the delay filter: all must complete with the right data.
Timing is not asserted; the Rust caller bounds the whole run.

usage: delay_aio.py URI   (memory export behind --filter=delay with rdelay, >= 1 MiB)
"""

import os
import sys

import nbd

from harness import done, expect, handle

h = handle()
h.connect_uri(sys.argv[1])
data = os.urandom(1 << 20)
h.pwrite(data, 0)
N = 1000
LEN = 512
bufs = []
for i in range(N):
    off = (i * 1031) % ((1 << 20) - LEN)
    b = nbd.Buffer(LEN)
    bufs.append((off, b, h.aio_pread(b, off)))
expect(h.aio_in_flight() > 0, "nothing in flight")
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, b, c in bufs:
    expect(h.aio_command_completed(c), "read at %d not completed" % off)
    expect(b.to_bytearray() == data[off:off + LEN], "read at %d returned wrong data" % off)
done(h)
