"""Many clients at once: open N connections, read from each, check the data, close them all.

usage: io_many_clients.py URI N
"""

import resource
import sys

import nbd

uri, n = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 100:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
handles = []
for i in range(n):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
for i, h in enumerate(handles):
    off = (i * 4096) % (1 << 20)
    data = h.pread(8, off)
    if data != off.to_bytes(8, "big"):
        print("FAIL: client %d read %r at %d" % (i, data, off))
        sys.exit(1)
for h in handles:
    h.shutdown()
print("ok %d" % n)
