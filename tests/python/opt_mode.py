"""Option negotiation step by step (libnbd opt mode): LIST, INFO, LIST_META_CONTEXT, GO, ABORT.

usage: opt_mode.py URI EXPECTED_SIZE
"""

import sys

import nbd

from harness import done, expect, handle

uri = sys.argv[1]
want = int(sys.argv[2])

h = handle()
h.set_opt_mode(True)
h.connect_uri(uri)
expect(h.aio_is_negotiating(), "not negotiating in opt mode")

names = []


def lst(name, description):
    names.append(name)
    return 0


n = h.opt_list(lst)
expect(n == len(names) and n >= 1, "opt_list returned %d, callback saw %r" % (n, names))
expect("" in names, "default export not listed: %r" % names)

# INFO on the default export reports the size; then GO must agree.
h.set_export_name("")
h.opt_info()
expect(h.get_size() == want, "INFO size %d != %d" % (h.get_size(), want))
info_flags = (h.is_read_only(), h.can_flush(), h.can_trim(), h.can_zero(), h.can_fua())

# List meta contexts: the base: wildcard must yield base:allocation.
h.clear_meta_contexts()
h.add_meta_context("base:")
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
expect("base:allocation" in ctxs, "LIST_META_CONTEXT base: gave %r" % ctxs)
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
expect(ctxs == ["base:allocation"], "LIST_META_CONTEXT base:allocation gave %r" % ctxs)

# Repeated INFO is fine.
h.opt_info()
h.opt_go()
expect(h.aio_is_ready(), "not ready after opt_go")
expect(h.get_size() == want, "GO size %d != %d" % (h.get_size(), want))
go_flags = (h.is_read_only(), h.can_flush(), h.can_trim(), h.can_zero(), h.can_fua())
expect(info_flags == go_flags, "INFO and GO disagree: %r vs %r" % (info_flags, go_flags))
expect(h.can_meta_context("base:allocation"), "base:allocation not negotiated by GO")
expect(h.pread(512, 0) is not None, "pread after opt_go")
done(h)

# A second handle that lists and then aborts cleanly.
h2 = handle()
h2.set_opt_mode(True)
h2.connect_uri(uri)
h2.opt_list(lambda name, desc: 0)
h2.opt_abort()
expect(h2.aio_is_closed(), "not closed after opt_abort")
print("OK")
