"""Several connections to one export: writes flushed on one are visible on the others
(the promise behind NBD_FLAG_CAN_MULTI_CONN, which the memory backend may advertise).

usage: multiconn.py URI
"""

import os
import sys

from harness import done, expect, handle

uri = sys.argv[1]
hs = []
for _ in range(4):
    h = handle()
    h.connect_uri(uri)
    hs.append(h)
for i, h in enumerate(hs):
    data = os.urandom(65536)
    h.pwrite(data, i * 65536)
    h.flush()
    for j, other in enumerate(hs):
        expect(other.pread(65536, i * 65536) == data, "connection %d does not see %d's write" % (j, i))
if hs[0].can_multi_conn():
    for h in hs:
        expect(h.can_multi_conn(), "multi-conn advertised inconsistently")
for h in hs[1:]:
    h.shutdown()
done(hs[0])
