"""Shared helpers for the libnbd (python3-libnbd) test scripts.

Every handle is created with debug on and a callback that records libnbd's messages; check()
fails if libnbd logged a server bug that it did not turn into an error (see the appendix of the
NBD protocol checklist). Scripts exit non-zero with a message on any failure, and the Rust test
that runs them reports stdout/stderr.
"""

import errno
import sys

import nbd

BAD_PHRASES = (
    "server bug",
    "bug in the server",
    "ignoring improper",
    "ignoring claim",
    "unexpected",
    "wrong byte length",
    "skipping unknown",
)

_handles = []


def handle(meta=True):
    """A new strict handle with a debug log; base:allocation requested unless meta=False."""
    h = nbd.NBD()
    log = []
    h.set_debug(True)
    h.set_debug_callback(lambda ctx, msg: log.append("%s: %s" % (ctx, msg)))
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    _handles.append(log)
    return h


def check_logs():
    if not any(_handles):
        fail("libnbd's debug callback captured nothing: the strictness check would be vacuous")
    for log in _handles:
        for msg in log:
            low = msg.lower()
            for bad in BAD_PHRASES:
                if bad in low:
                    fail("libnbd logged a server problem: %s" % msg)


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.stderr.flush()
    sys.exit(1)


def expect(cond, msg):
    if not cond:
        fail(msg)


def expect_errno(fn, want, what):
    """fn() must fail with nbd.Error whose errno is want."""
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            fail("%s: expected %s, got errno %s (%s)"
                 % (what, errno.errorcode.get(want), errno.errorcode.get(e.errnum, e.errnum), e.string))
        return
    fail("%s: expected %s, but it succeeded" % (what, errno.errorcode.get(want)))


def extents(h, length, offset, flags=0):
    """block_status as a list of (length, flags) for base:allocation."""
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def done(h=None):
    if h is not None:
        h.shutdown()
    check_logs()
    print("OK")
