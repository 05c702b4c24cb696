"""The error filter with a trigger file flipped during the run: requests fail with EIO only while
the file exists, and the connection survives the errors.

usage: filters_overlay_error.py URI TRIGGER   (--filter=error error-rate=100% error-file=TRIGGER)
"""

import errno
import os
import sys
import time

from harness import done, expect, expect_errno, handle

uri, trigger = sys.argv[1], sys.argv[2]
expect(not os.path.exists(trigger), "trigger file exists at the start")
h = handle()
h.connect_uri(uri)
h.pwrite(b"\x11" * 4096, 0)
expect(h.pread(4096, 0) == b"\x11" * 4096, "read before the trigger")

for _ in range(3):
    open(trigger, "w").close()
    time.sleep(0.05)  # the filter trusts its last look at the file for a millisecond
    expect_errno(lambda: h.pread(4096, 0), errno.EIO, "read while the trigger exists")
    expect_errno(lambda: h.pwrite(b"\x22" * 512, 0), errno.EIO, "write while the trigger exists")
    os.unlink(trigger)
    time.sleep(0.05)
    expect(h.pread(4096, 0) == b"\x11" * 4096, "read after the trigger is gone")

done(h)
