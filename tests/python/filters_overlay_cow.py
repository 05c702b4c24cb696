"""Writes, zeroes and trims through the cow filter: every read matches a model of the disk, and a
second connection sees the same overlay.

usage: filters_overlay_cow.py URI   (a cow export of at least 1 MiB)
"""

import os
import sys

import nbd

from harness import done, expect, handle

uri = sys.argv[1]
h = handle()
h.connect_uri(uri)
size = h.get_size()
expect(not h.is_read_only(), "cow export is read-only")
model = bytearray(h.pread(size, 0))


def write(off, data):
    h.pwrite(data, off)
    model[off:off + len(data)] = data


def zero(off, n, flags=0):
    h.zero(n, off, flags)
    model[off:off + n] = bytes(n)


# Aligned, unaligned inside one block, unaligned across blocks, and at the very end.
write(65536, os.urandom(65536))
write(100, os.urandom(10))
write(200000, os.urandom(70000))
write(size - 3, b"end")
zero(300000, 5000)
zero(393216, 131072)
# A trim makes whole blocks read as zeroes and leaves partial ones.
h.trim(65536 * 3, 655360 - 100)
for b in range(655360, 655360 + 131072, 65536):
    model[b:b + 65536] = bytes(65536)
h.flush()

expect(h.pread(size, 0) == model, "contents differ from the model")
h2 = handle()
h2.connect_uri(uri)
expect(h2.pread(size, 0) == model, "a second connection sees another disk")
h2.shutdown()
done(h)
