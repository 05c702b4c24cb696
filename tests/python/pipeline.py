"""Many requests in flight on one connection (aio): writes, reads, flushes, zeroes interleaved.

usage: pipeline.py URI   (writable export of at least 32 MiB)
"""

import os
import sys

import nbd

from harness import done, expect, handle

h = handle()
h.connect_uri(sys.argv[1])
N = 512
BS = 65536
chunks = [os.urandom(BS) for _ in range(N)]

# Phase 1: N writes in flight, then a flush.
cookies = [h.aio_pwrite(chunks[i], i * BS) for i in range(N)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    expect(h.aio_command_completed(c), "write %d not completed" % c)
h.flush()

# Phase 2: reads of everything, plus interleaved zeroes on odd blocks after their reads.
bufs = [nbd.Buffer(BS) for _ in range(N)]
rcookies = [h.aio_pread(bufs[i], i * BS) for i in range(N)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(rcookies):
    expect(h.aio_command_completed(c), "read %d not completed" % i)
    expect(bufs[i].to_bytearray() == chunks[i], "aio read %d returned wrong data" % i)

# Phase 3: mixed commands, with small unaligned reads in between.
mixed = []
for i in range(1, N, 2):
    mixed.append(h.aio_zero(BS, i * BS))
small = []
for i in range(0, N, 2):
    b = nbd.Buffer(100)
    small.append((i, b, h.aio_pread(b, i * BS + 17)))
mixed.append(h.aio_flush())
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in mixed:
    expect(h.aio_command_completed(c), "mixed command not completed")
for i, b, c in small:
    expect(h.aio_command_completed(c), "small read not completed")
    expect(b.to_bytearray() == chunks[i][17:117], "small read %d wrong" % i)
for i in range(N):
    got = h.pread(BS, i * BS)
    want = chunks[i] if i % 2 == 0 else bytes(BS)
    expect(got == want, "block %d wrong after zeroing odd blocks" % i)
done(h)
