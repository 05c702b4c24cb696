"""The info backend's modes, seen by a client.

usage: generated_info.py MODE URI [ARG]
  exportname URI NAME        the disk is NAME (the export name in URI)
  base64exportname URI WANT_HEX
                             the disk is the base64-decoding of the export name in URI
  address URI REGEX          the disk is the client's address, matching REGEX
  time URI                   12 bytes: seconds and microseconds since the epoch, big-endian
  uptime URI                 12 bytes: small and growing
  conntime URI               12 bytes: small and growing
"""

import re
import struct
import sys
import time

import nbd

from harness import done, expect, handle

mode, uri = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
h = handle()
h.connect_uri(uri)
size = h.get_size()
expect(h.is_read_only(), "info must be read-only")


def stamp():
    secs, usecs = struct.unpack(">QI", h.pread(12, 0))
    expect(usecs < 1000000, "microseconds out of range: %d" % usecs)
    return secs + usecs / 1e6


if mode == "exportname":
    want = args[0].encode()
    expect(size == len(want), "size %d, want %d" % (size, len(want)))
    if size:
        expect(h.pread(size, 0) == want, "content differs")
        expect(h.pread(size - 1, 1) == want[1:], "partial read differs")
elif mode == "base64exportname":
    want = bytes.fromhex(args[0])
    expect(size == len(want), "size %d, want %d" % (size, len(want)))
    if size:
        expect(h.pread(size, 0) == want, "content differs")
elif mode == "address":
    got = h.pread(size, 0).decode() if size else ""
    expect(re.fullmatch(args[0], got) is not None, "address %r does not match %r" % (got, args[0]))
    expect(not h.can_multi_conn(), "address mode must not offer multi-conn")
elif mode in ("time", "uptime", "conntime"):
    expect(size == 12, "size %d" % size)
    expect(not h.can_multi_conn(), "time modes must not offer multi-conn")
    t1 = stamp()
    time.sleep(0.05)
    t2 = stamp()
    expect(t2 - t1 >= 0.04, "%s did not advance: %f then %f" % (mode, t1, t2))
    if mode == "time":
        expect(abs(t2 - time.time()) < 5, "server time %f is far from %f" % (t2, time.time()))
    elif mode == "uptime":
        expect(0 < t2 < 60, "uptime %f" % t2)
    else:
        expect(0 < t2 < 5, "connection time %f" % t2)
else:
    expect(False, "unknown mode %s" % mode)

done()
