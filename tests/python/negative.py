"""Requests the server must refuse, sent with libnbd's strict mode off so they reach the server.
After every refusal the connection must still work.

usage: negative.py RW_URI RO_URI   (memory exports of 1 MiB, one writable, one read-only)
"""

import errno
import sys

import nbd

from harness import done, expect, expect_errno, handle


def still_works(h, what):
    try:
        got = h.pread(512, 0)
    except nbd.Error as e:
        raise SystemExit("FAIL: connection unusable after %s: %s" % (what, e))
    expect(len(got) == 512, "short read after %s" % what)


h = handle()
h.connect_uri(sys.argv[1])
size = h.get_size()
h.set_strict_mode(0)
cases = [
    ("read past end", lambda: h.pread(512, size), errno.EINVAL),
    ("read straddling end", lambda: h.pread(1024, size - 512), errno.EINVAL),
    ("read with offset wrap", lambda: h.pread(512, 2**64 - 256), errno.EINVAL),
    ("write past end", lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC),
    ("write straddling end", lambda: h.pwrite(b"y" * 1024, size - 512), errno.ENOSPC),
    ("zero past end", lambda: h.zero(512, size), errno.ENOSPC),
    ("trim past end", lambda: h.trim(512, size), errno.EINVAL),
    ("block status past end", lambda: h.block_status(512, size, lambda *a: 0), errno.EINVAL),
    ("unknown flag 0x100 on read", lambda: h.pread(512, 0, 0x100), errno.EINVAL),
    ("REQ_ONE on read", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL),
    ("NO_HOLE on read", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
    ("NO_HOLE on write", lambda: h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
    ("NO_HOLE on flush", lambda: h.flush(nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
    ("unknown flag 0x8000 on write", lambda: h.pwrite(b"z" * 512, 0, 0x8000), errno.EINVAL),
]
for what, fn, want in cases:
    expect_errno(fn, want, what)
    still_works(h, what)
# The failed writes must not have changed anything.
expect(h.pread(512, 0) == bytes(512), "a refused write changed the data")
# Zero-length read: unspecified by the spec, but must not break the connection.
try:
    h.pread(0, 0)
except nbd.Error:
    pass
still_works(h, "zero-length read")
done(h)

ro = handle()
ro.connect_uri(sys.argv[2])
expect(ro.is_read_only(), "-r export is not read-only")
ro.set_strict_mode(0)
for what, fn in [
    ("write on read-only", lambda: ro.pwrite(b"w" * 512, 0)),
    ("zero on read-only", lambda: ro.zero(512, 0)),
    ("trim on read-only", lambda: ro.trim(512, 0)),
]:
    expect_errno(fn, errno.EPERM, what)
    still_works(ro, what)
expect(ro.pread(4096, 0) == bytes(4096), "a refused write changed the read-only export")
done(ro)
