"""Backend semantics through libnbd.

usage: backends.py KIND URI [ARGS...]
  null SIZE       reads zero, writes accepted and discarded
  zero            size 0
  ones SIZE       reads 0xff, writes accepted and discarded
  pattern SIZE    read-only; every 8 bytes hold their own offset, big-endian
  full SIZE       reads zero, every write fails with ENOSPC
  bigmem          memory of size 2^63-1: write and read near the end
  file SIZE PATH  file backend: data round trip, checks the file on disk
"""

import errno
import os
import struct
import sys

import nbd

from harness import done, expect, expect_errno, extents, handle

kind, uri = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
h = handle()
h.connect_uri(uri)
size = h.get_size()

if kind == "null":
    expect(size == int(args[0]), "null size %d" % size)
    expect(h.pread(65536, 0) == bytes(65536), "null must read zero")
    if not h.is_read_only():
        h.pwrite(b"\x01" * 4096, 0)
        expect(h.pread(4096, 0) == bytes(4096), "null must discard writes")
elif kind == "zero":
    expect(size == 0, "zero backend size %d" % size)
    h.set_strict_mode(0)
    expect_errno(lambda: h.pread(1, 0), errno.EINVAL, "read from a 0-byte disk")
elif kind == "ones":
    expect(size == int(args[0]), "ones size %d" % size)
    expect(h.pread(65536, 0) == b"\xff" * 65536, "ones must read 0xff")
    expect(h.pread(100, size - 100) == b"\xff" * 100, "ones tail must read 0xff")
    if not h.is_read_only():
        h.pwrite(bytes(4096), 0)
        expect(h.pread(4096, 0) == b"\xff" * 4096, "ones must discard writes")
elif kind == "pattern":
    expect(size == int(args[0]), "pattern size %d" % size)
    expect(h.is_read_only(), "pattern must be read-only")
    for off in (0, 8, 4096, 123456 & ~7, size - 8):
        (word,) = struct.unpack(">Q", h.pread(8, off))
        expect(word == off, "pattern word at %d is %d" % (off, word))
    buf = h.pread(65536, 65536)
    for i in range(0, 65536, 8):
        (word,) = struct.unpack(">Q", buf[i:i + 8])
        expect(word == 65536 + i, "pattern word at %d is %d" % (65536 + i, word))
    # An unaligned read gives the matching slice of the pattern.
    raw = h.pread(32, 1000 - 3)
    want = b"".join(struct.pack(">Q", o) for o in range(992, 1040, 8))[5:37]
    expect(raw == want, "unaligned pattern read differs: %r vs %r" % (raw, want))
elif kind == "full":
    expect(size == int(args[0]), "full size %d" % size)
    expect(h.pread(65536, 0) == bytes(65536), "full must read zero")
    h.set_strict_mode(0)
    expect_errno(lambda: h.pwrite(b"x" * 512, 0), errno.ENOSPC, "write to full")
    if h.can_zero():
        expect_errno(lambda: h.zero(512, 0), errno.ENOSPC, "zero on full")
    expect(h.pread(512, 0) == bytes(512), "connection unusable after ENOSPC")
elif kind == "bigmem":
    expect(size == 2**63 - 1, "size %d is not 2^63-1" % size)
    data = os.urandom(4096)
    off = size - 4096
    h.pwrite(data, off)
    expect(h.pread(4096, off) == data, "read near 2^63-1 differs")
    h.pwrite(b"\x99", size - 1)
    expect(h.pread(1, size - 1) == b"\x99", "last byte differs")
    h.pwrite(b"\x77" * 512, 2**62)
    expect(h.pread(512, 2**62) == b"\x77" * 512, "read at 2^62 differs")
    expect(h.pread(65536, 2**40) == bytes(65536), "unwritten area not zero")
    ext = extents(h, 65536, 2**40)
    expect(ext and ext[0][1] & nbd.STATE_ZERO, "unwritten area not reported zero: %r" % ext)
    h.set_strict_mode(0)
    expect_errno(lambda: h.pread(2, size - 1), errno.EINVAL, "read across 2^63-1")
    h.trim(4096, off)
    h.zero(512, 2**62)
    expect(h.pread(512, 2**62) == bytes(512), "zero at 2^62 not zero")
elif kind == "file":
    expect(size == int(args[0]), "file size %d" % size)
    path = args[1]
    data = os.urandom(65536)
    h.pwrite(data, 131072)
    expect(h.pread(65536, 131072) == data, "file round trip differs")
    h.flush()
    with open(path, "rb") as f:
        f.seek(131072)
        expect(f.read(65536) == data, "data did not reach the file")
    h.zero(4096, 131072)
    expect(h.pread(4096, 131072) == bytes(4096), "zeroed file range not zero")
    with open(path, "rb") as f:
        f.seek(131072)
        expect(f.read(4096) == bytes(4096), "zero did not reach the file")
else:
    raise SystemExit("unknown kind " + kind)
done(h)
