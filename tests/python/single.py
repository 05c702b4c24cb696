"""The server in -s mode, started by libnbd itself (nbd_connect_command).

usage: single.py SERVER_BINARY
"""

import os
import sys

import nbd

from harness import done, expect, handle

h = handle()
h.connect_command([sys.argv[1], "-s", "memory", "1M"])
expect(h.get_size() == 1 << 20, "size %d" % h.get_size())
data = os.urandom(65536)
h.pwrite(data, 4096)
expect(h.pread(65536, 4096) == data, "-s round trip differs")
h.flush()
done(h)
