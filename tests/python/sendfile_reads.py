"""Unaligned reads of 64 KiB and more from a file export, compared with the file itself, with and
without structured replies. Usage: sendfile_reads.py URI FILE"""
import sys

import nbd

data = open(sys.argv[2], "rb").read()
for sr in (True, False):
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS)
    h.set_request_structured_replies(sr)
    h.connect_uri(sys.argv[1])
    for off, n in ((1, 65536), (12345, 300001), (len(data) - 70000, 70000), (4096, 2**20)):
        assert h.pread(n, off) == data[off:off + n], (sr, off, n)
    h.shutdown()
print("ok")
