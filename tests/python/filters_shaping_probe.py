"""Run a list of operations against one NBD export and print one line per operation, so the same
script run against blocksmith and against nbdkit can be compared line by line.

Usage: filters_shaping_probe.py URI OP...

Operations (offsets and lengths in bytes):
  size                      the export size
  can:NAME                  write, flush, fua, trim, zero, fast_zero, cache, multi_conn, df,
                            extents (base:allocation negotiated) -> true/false
  bs:min | bs:pref | bs:max the advertised block size constraints (0: none advertised)
  loose                     stop libnbd refusing unaligned requests itself (STRICT_ALIGN off),
                            so the server's own answer is seen
  read:OFF:LEN              -> "zeroes", the bytes in hex (up to 16), or a sha256 prefix
  write:OFF:LEN:BYTE[:fua]  write LEN copies of BYTE (decimal or 0x..)
  writefile:OFF:PATH        write the contents of PATH
  zero:OFF:LEN[:fast|:nohole|:fua]
  trim:OFF:LEN
  cache:OFF:LEN
  flush
  map                       block status over the whole export: "off+len:type ..." (merged)
  touch:PATH | rm:PATH      create or remove a file (for trigger files)

Each failed request prints "errno NAME" instead of failing the script; anything else that goes
wrong (a libnbd complaint about the server, a bad operation) exits non-zero.
"""

import errno
import hashlib
import os
import sys

import nbd

import harness


def describe(data):
    if not any(data):
        return "zeroes"
    if len(data) <= 16:
        return bytes(data).hex()
    return "sha256:" + hashlib.sha256(bytes(data)).hexdigest()[:16]


def number(s):
    return int(s, 0)


def block_map(h):
    size = h.get_size()
    runs = []
    off = 0
    while off < size:
        ext = harness.extents(h, min(size - off, 1 << 30), off)
        if not ext:
            harness.fail("empty block status reply at %d" % off)
        for length, flags in ext:
            length = min(length, size - off)
            if length == 0:
                continue
            if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == off:
                runs[-1][1] += length
            else:
                runs.append([off, length, flags])
            off += length
            if off >= size:
                break
    return " ".join("%d+%d:%d" % tuple(r) for r in runs)


def run(h, op):
    parts = op.split(":")
    name = parts[0]
    if name == "size":
        return str(h.get_size())
    if name == "can":
        what = parts[1]
        if what == "extents":
            return str(bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))).lower()
        if what == "write":
            return str(not h.is_read_only()).lower()
        return str(bool(getattr(h, "can_" + what)())).lower()
    if name == "bs":
        which = {"min": nbd.SIZE_MINIMUM, "pref": nbd.SIZE_PREFERRED, "max": nbd.SIZE_MAXIMUM}[parts[1]]
        return str(h.get_block_size(which))
    if name == "loose":
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        return "ok"
    if name == "touch":
        open(parts[1], "wb").close()
        return "ok"
    if name == "rm":
        os.remove(parts[1])
        return "ok"
    try:
        if name == "read":
            return describe(h.pread(number(parts[2]), number(parts[1])))
        if name == "write":
            flags = nbd.CMD_FLAG_FUA if parts[4:] == ["fua"] else 0
            h.pwrite(bytes([number(parts[3])]) * number(parts[2]), number(parts[1]), flags)
        elif name == "writefile":
            with open(parts[2], "rb") as f:
                h.pwrite(f.read(), number(parts[1]))
        elif name == "zero":
            flags = 0
            for f in parts[3:]:
                flags |= {"fast": nbd.CMD_FLAG_FAST_ZERO, "nohole": nbd.CMD_FLAG_NO_HOLE,
                          "fua": nbd.CMD_FLAG_FUA}[f]
            h.zero(number(parts[2]), number(parts[1]), flags)
        elif name == "trim":
            h.trim(number(parts[2]), number(parts[1]))
        elif name == "cache":
            h.cache(number(parts[2]), number(parts[1]))
        elif name == "flush":
            h.flush()
        elif name == "map":
            return block_map(h)
        else:
            harness.fail("unknown operation %r" % op)
        return "ok"
    except nbd.Error as e:
        return "errno " + errno.errorcode.get(e.errnum, str(e.errnum))


def main():
    uri = sys.argv[1]
    h = harness.handle()
    h.connect_uri(uri)
    for op in sys.argv[2:]:
        print("%s -> %s" % (op, run(h, op)))
        sys.stdout.flush()
    harness.check_logs()
    h.shutdown()


main()
