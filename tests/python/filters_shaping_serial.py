"""noparallel through libnbd.

  filters_shaping_serial.py burst URI   two connections, 200 concurrent writes-then-reads each
                                       (disjoint ranges), all must succeed with the right data
  filters_shaping_serial.py turns URI   serialize=connections: a second client's request waits
                                       until the first client has disconnected
  filters_shaping_serial.py rmw URI     blocksize minblock=4k: four connections write 8-byte
                                       pieces of the same 4 KiB blocks at once; a lost
                                       read-modify-write would leave old bytes behind
"""

import sys
import time

import nbd

import harness


def run_until(handles, cond, seconds):
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        for h in handles:
            if h.aio_in_flight() > 0:
                h.poll(0)
        time.sleep(0.002)
    return True


def burst(uri):
    handles = []
    for _ in range(2):
        h = harness.handle()
        h.connect_uri(uri)
        handles.append(h)
    n = 200
    pending = []
    for hi, h in enumerate(handles):
        for i in range(n):
            k = hi * n + i
            buf = nbd.Buffer.from_bytearray(bytearray([k % 251]) * 512)
            pending.append((h, h.aio_pwrite(buf, k * 512), buf))

    def all_done():
        # aio_command_completed raises if the write failed, and retires the cookie once true.
        pending[:] = [p for p in pending if not p[0].aio_command_completed(p[1])]
        return not pending

    harness.expect(run_until(handles, all_done, 60), "writes did not complete")
    for hi, h in enumerate(handles):
        for i in range(n):
            k = hi * n + i
            got = h.pread(512, k * 512)
            harness.expect(got == bytearray([k % 251]) * 512, "data of write %d differs" % k)
    for h in handles:
        h.shutdown()
    harness.check_logs()
    print("OK")


def turns(uri):
    first = harness.handle()
    first.connect_uri(uri)
    second = harness.handle()
    second.connect_uri(uri)
    buf = nbd.Buffer(512)
    cookie = second.aio_pread(buf, 0)
    state = {"done": False}

    def finished():
        if not state["done"]:
            state["done"] = second.aio_command_completed(cookie)
        return state["done"]

    harness.expect(not run_until([second], finished, 0.5),
                   "the second client's request ran while the first was connected")
    harness.expect(len(first.pread(512, 0)) == 512, "first client's read")
    first.shutdown()
    harness.expect(run_until([second], finished, 20),
                   "the second client's request did not run after the first disconnected")
    second.shutdown()
    harness.check_logs()
    print("OK")


def rmw(uri):
    handles = []
    for _ in range(4):
        h = harness.handle()
        h.connect_uri(uri)
        handles.append(h)
    pending = []
    expected = bytearray(16384)
    for i in range(64):
        for hi, h in enumerate(handles):
            off = (i * 4 + hi) * 64
            piece = bytearray([1 + hi, i]) * 4
            expected[off:off + 8] = piece
            buf = nbd.Buffer.from_bytearray(piece)
            pending.append((h, h.aio_pwrite(buf, off), buf))

    def all_done():
        pending[:] = [p for p in pending if not p[0].aio_command_completed(p[1])]
        return not pending

    harness.expect(run_until(handles, all_done, 60), "writes did not complete")
    got = handles[0].pread(16384, 0)
    for off in range(0, 16384, 64):
        harness.expect(got[off:off + 8] == expected[off:off + 8],
                       "the 8 bytes written at %d were lost or overwritten" % off)
    for h in handles:
        h.shutdown()
    harness.check_logs()
    print("OK")


{"burst": burst, "turns": turns, "rmw": rmw}[sys.argv[1]](sys.argv[2])
