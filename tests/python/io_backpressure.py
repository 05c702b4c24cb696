"""Budget backpressure: many 1 MiB writes and reads in flight against a server whose memory
budget holds only two of them. Every request must complete with the right data (the server
stops reading while the budget is spent, and resumes: it never deadlocks or fails requests).

usage: io_backpressure.py URI
"""

import sys

import nbd

from harness import done, expect, handle

uri = sys.argv[1]
h = handle()
h.connect_uri(uri)
MIB = 1 << 20
N = int(sys.argv[2]) if len(sys.argv) > 2 else 48

writes = []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray([i % 251 + 1]) * MIB)
    writes.append((h.aio_pwrite(b, i * MIB), b))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c, _ in writes:
    expect(h.aio_command_completed(c), "write completed")
reads = []
for i in range(N):
    b = nbd.Buffer(MIB)
    reads.append((h.aio_pread(b, i * MIB), b, i))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c, _, _ in reads:
    expect(h.aio_command_completed(c), "read completed")
for _, b, i in reads:
    expect(b.to_bytearray() == bytearray([i % 251 + 1]) * MIB, "block %d reads back" % i)
done(h)
