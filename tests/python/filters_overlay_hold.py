"""Hold a connection open until told to let go: connect, create READY, wait (bounded) until
RELEASE exists, check the export still works, disconnect.

usage: filters_overlay_hold.py URI READY RELEASE
"""

import os
import sys
import time

from harness import done, expect, fail, handle

uri, ready, release = sys.argv[1], sys.argv[2], sys.argv[3]
h = handle()
h.connect_uri(uri)
h.pread(512, 0)
open(ready, "w").close()
deadline = time.time() + 30
while not os.path.exists(release):
    if time.time() > deadline:
        fail("never released")
    time.sleep(0.02)
expect(h.pread(512, 0) == bytes(512), "the connected client is still served")
done(h)
