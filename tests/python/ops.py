"""Every data command through libnbd in strict mode against a writable memory export.

usage: ops.py URI   (export of at least 16 MiB, initially all zero)
"""

import errno
import os
import sys

import nbd

from harness import done, expect, extents, handle

MIB = 1 << 20

h = handle()
h.connect_uri(sys.argv[1])
size = h.get_size()
expect(size >= 16 * MIB, "export too small: %d" % size)
for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_meta_context"):
    if cap == "can_meta_context":
        ok = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    else:
        ok = getattr(h, cap)()
    expect(ok, "memory export should advertise %s" % cap)
expect(not h.is_read_only(), "export is read-only")
expect(h.get_structured_replies_negotiated(), "structured replies not negotiated")

# Fresh disk reads as zeroes.
expect(h.pread(MIB, 0) == bytes(MIB), "fresh disk is not zero")

# pwrite / pread, aligned and unaligned, with and without FUA.
data = os.urandom(MIB)
h.pwrite(data, 0)
expect(h.pread(MIB, 0) == data, "pread after pwrite differs")
odd = os.urandom(12345)
h.pwrite(odd, 3 * MIB + 7)
expect(h.pread(12345, 3 * MIB + 7) == odd, "unaligned pread differs")
expect(h.pread(7, 3 * MIB) == bytes(7), "bytes before an unaligned write changed")
fua = os.urandom(65536)
h.pwrite(fua, 4 * MIB, nbd.CMD_FLAG_FUA)
expect(h.pread(65536, 4 * MIB) == fua, "FUA write differs")
h.flush()

# Large request (8 MiB in one command).
big = os.urandom(8 * MIB)
h.pwrite(big, 8 * MIB)
expect(h.pread(8 * MIB, 8 * MIB) == big, "8 MiB pread differs")

# Structured read chunks: must cover the range exactly once.
seen = []


def chunk(buf, offset, status, err):
    seen.append((offset, len(buf), status))
    return 0


got = h.pread_structured(2 * MIB, 0, chunk)
expect(got[:MIB] == data and got[MIB:] == bytes(MIB), "pread_structured content differs")
seen.sort()
pos = 0
for off, ln, st in seen:
    expect(off == pos, "structured read chunks overlap or leave gaps: %r" % seen)
    expect(st in (nbd.READ_DATA, nbd.READ_HOLE), "unexpected chunk status %r" % (st,))
    pos += ln
expect(pos == 2 * MIB, "structured read chunks do not cover the request: %r" % seen)

# DF: at most one chunk.
if h.can_df():
    seen = []
    h.pread_structured(65536, MIB - 32768, chunk, nbd.CMD_FLAG_DF)
    expect(len(seen) == 1, "DF read returned %d chunks" % len(seen))

# write zeroes (with and without NO_HOLE), then trim.
h.zero(65536, 16384)
expect(h.pread(65536, 16384) == bytes(65536), "zeroed range is not zero")
expect(h.pread(16384, 0) == data[:16384], "zero touched data before the range")
h.zero(65536, 131072, nbd.CMD_FLAG_NO_HOLE)
expect(h.pread(65536, 131072) == bytes(65536), "NO_HOLE zero is not zero")
h.zero(65536, 262144, nbd.CMD_FLAG_FUA)
expect(h.pread(65536, 262144) == bytes(65536), "FUA zero is not zero")
if h.can_fast_zero():
    try:
        h.zero(65536, 393216, nbd.CMD_FLAG_FAST_ZERO)
        expect(h.pread(65536, 393216) == bytes(65536), "FAST_ZERO zero is not zero")
    except nbd.Error as e:
        expect(e.errnum == errno.ENOTSUP, "FAST_ZERO may only fail with ENOTSUP, got %s" % e)
# After TRIM the content is unspecified (checked against block status below).
h.trim(MIB, 0)
h.trim(65536, 8 * MIB, nbd.CMD_FLAG_FUA)

# cache is only a hint, and must not change the data.
if h.can_cache():
    h.cache(MIB, 8 * MIB)
expect(h.pread(8 * MIB, 8 * MIB)[65536:] == big[65536:], "cache/trim changed other data")

# Block status: a full map covering what we asked for, consistent with the contents.
ext = extents(h, 16 * MIB, 0)
expect(len(ext) >= 1, "no extents")
expect(sum(length for length, _ in ext[:-1]) < 16 * MIB, "first N-1 extents reach past the request")
off = 0
for length, flags in ext:
    expect(length > 0, "zero-length extent")
    expect(flags & ~3 == 0, "unknown base:allocation bits %#x" % flags)
    if flags & nbd.STATE_ZERO and off < 16 * MIB:
        n = min(length, 16 * MIB - off, 4 * MIB)
        expect(h.pread(n, off) == bytes(n), "extent at %d claims ZERO but is not" % off)
    off += length
# Data we wrote at 8 MiB (beyond the trimmed 64 KiB) must not be reported as a zero hole.
for length, flags in extents(h, MIB, 9 * MIB):
    expect(not flags & nbd.STATE_ZERO, "written data reported as ZERO at 9 MiB")
    break

# REQ_ONE: exactly one extent, no longer than requested.
for req_off, req_len in ((0, 16 * MIB), (9 * MIB, 4096), (3 * MIB + 1, 1000)):
    one = extents(h, req_len, req_off, nbd.CMD_FLAG_REQ_ONE)
    expect(len(one) == 1, "REQ_ONE gave %d extents" % len(one))
    expect(0 < one[0][0] <= req_len, "REQ_ONE extent length %d > %d" % (one[0][0], req_len))

# Near the end of the export.
tail = os.urandom(4096)
h.pwrite(tail, size - 4096)
expect(h.pread(4096, size - 4096) == tail, "tail pread differs")
h.pwrite(b"\x42", size - 1)
expect(h.pread(1, size - 1) == b"\x42", "last byte differs")
one = extents(h, 1, size - 1, nbd.CMD_FLAG_REQ_ONE)
expect(len(one) == 1 and one[0][0] == 1, "block status of the last byte: %r" % one)

h.flush()
done(h)
