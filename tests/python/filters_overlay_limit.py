"""limit=1: a second client cannot open the export while the first has it; once the first
leaves, a new client can.

usage: filters_overlay_limit.py URI
"""

import sys
import time

import nbd

from harness import done, expect, fail, handle

uri = sys.argv[1]
h1 = handle()
h1.connect_uri(uri)
expect(h1.pread(512, 0) == bytes(512), "first client reads")

# The server closes the second connection before the handshake, as nbdkit does: a plain
# handle, since the strict harness would (rightly) flag an unexpected disconnect as a problem.
h2 = nbd.NBD()
try:
    h2.connect_uri(uri)
    fail("a second client was let in with limit=1")
except nbd.Error:
    pass

h1.shutdown()
# The server sees the first client go a moment after it disconnects.
deadline = time.time() + 10
while True:
    # Plain handles for the attempts: until the server has seen the first client go, an
    # attempt is closed at connect, which the strict harness would flag.
    h3 = nbd.NBD()
    try:
        h3.connect_uri(uri)
        break
    except nbd.Error as e:
        if time.time() > deadline:
            fail("no client could connect after the first left: %s" % e)
        time.sleep(0.05)
expect(h3.pread(512, 0) == bytes(512), "a new client reads once the first has left")
h3.shutdown()
done()  # checks the strict handle's (h1's) debug log
