"""Compare reads of two NBD servers, or check a self-verifying disk's writes.

usage:
  generated_compare.py read URI_A URI_B OFFSET:LENGTH...
      the same reads from both must return the same bytes (any alignment)
  generated_compare.py selfwrite URI OFFSET:LENGTH...
      writing back what a read at the same offset returned must succeed, and writing
      something else must fail with EIO (random and sparse-random disks)
"""

import errno
import sys

import nbd

from harness import done, expect, expect_errno, handle

mode = sys.argv[1]


def ranges(args):
    out = []
    for a in args:
        off, length = a.split(":")
        out.append((int(off), int(length)))
    return out


if mode == "read":
    a, b = handle(), handle()
    a.connect_uri(sys.argv[2])
    b.connect_uri(sys.argv[3])
    expect(a.get_size() == b.get_size(), "sizes differ: %d vs %d" % (a.get_size(), b.get_size()))
    for off, length in ranges(sys.argv[4:]):
        x = a.pread(length, off)
        y = b.pread(length, off)
        if x != y:
            i = next(k for k in range(length) if x[k] != y[k])
            expect(False, "read %d at %d differs at +%d: %02x vs %02x" % (length, off, i, x[i], y[i]))
elif mode == "selfwrite":
    h = handle()
    h.connect_uri(sys.argv[2])
    for off, length in ranges(sys.argv[3:]):
        data = h.pread(length, off)
        h.pwrite(data, off)
        bad = bytearray(data)
        bad[length // 2] ^= 0x5A
        expect_errno(lambda: h.pwrite(bytes(bad), off), errno.EIO,
                     "changed write of %d at %d" % (length, off))
else:
    expect(False, "unknown mode %s" % mode)

done()
