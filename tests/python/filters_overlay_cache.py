"""Write a whole disk through a size-limited cache, read it back, flush, and leave the expected
contents in a file for the caller to compare with the disk below.

usage: filters_overlay_cache.py URI EXPECTED_OUT
"""

import os
import sys

from harness import done, expect, handle

uri, out = sys.argv[1], sys.argv[2]
h = handle()
h.connect_uri(uri)
size = h.get_size()
data = bytearray(os.urandom(size))
chunk = 256 * 1024
for off in range(0, size, chunk):
    h.pwrite(data[off:off + chunk], off)
# Unaligned overwrites too, which need the old block contents.
for off in range(1000, size - 10000, 700001):
    piece = os.urandom(9000)
    h.pwrite(piece, off)
    data[off:off + len(piece)] = piece
for off in range(0, size, chunk):
    expect(h.pread(chunk, off) == data[off:off + chunk], "read back differs at %d" % off)
h.flush()
with open(out, "wb") as f:
    f.write(data)
done(h)
