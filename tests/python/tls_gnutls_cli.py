#!/usr/bin/env python3
"""Drive gnutls-cli (GnuTLS's own client) against blocksmith's STARTTLS, with a pre-shared key
or X.509 certificates.

gnutls-cli cannot speak NBD's STARTTLS itself, so a relay in this script does the plaintext
part: it connects to the server's Unix socket, reads the greeting, sends the client flags and
NBD_OPT_STARTTLS, checks the ACK, and from then on copies bytes both ways between the server
and gnutls-cli, which connected to the relay over 127.0.0.1 and does the TLS handshake. The NBD
options and requests after that go through gnutls-cli's stdin and come back on its stdout
(informational messages go to --logfile), so the whole session runs inside GnuTLS's TLS.

usage: tls_gnutls_cli.py SOCKET CREDENTIALS PRIORITY LOGFILE
CREDENTIALS is psk:USER:HEXKEY, or x509:CAFILE (the server's certificate must name localhost).
prints "ok VERSION-LINE" after a GO and a READ of the first 512 bytes, or "refused: ..." if
the TLS handshake failed (exit 0 in both cases, so the caller asserts on which), exit 1 on
anything else.
"""

import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

OPT_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
OPT_STARTTLS, OPT_GO = 5, 7
REP_ACK = 1
DEADLINE = time.monotonic() + 30


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        s.settimeout(max(0.1, DEADLINE - time.monotonic()))
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return buf


def relay(listener, sock_path, result):
    try:
        client, _ = listener.accept()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(sock_path)
        greeting = recv_exact(server, 18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
        server.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        server.sendall(struct.pack(">QII", OPT_MAGIC, OPT_STARTTLS, 0))
        magic, opt, typ, length = struct.unpack(">QIII", recv_exact(server, 20))
        assert (magic, opt, typ, length) == (REPLY_MAGIC, OPT_STARTTLS, REP_ACK, 0), (magic, opt, typ)
        result["starttls"] = True
        socks = [client, server]
        while True:
            r, _, _ = select.select(socks, [], [], max(0.1, DEADLINE - time.monotonic()))
            if not r or time.monotonic() > DEADLINE:
                return
            for s in r:
                data = s.recv(65536)
                if not data:
                    # Pass the half-close on, then stop.
                    other = server if s is client else client
                    try:
                        other.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                (server if s is client else client).sendall(data)
    except Exception as e:  # reported by the main thread
        result["error"] = repr(e)


def read_stdout(proc, n):
    buf = b""
    fd = proc.stdout.fileno()
    while len(buf) < n:
        r, _, _ = select.select([fd], [], [], max(0.1, DEADLINE - time.monotonic()))
        if not r:
            raise TimeoutError(f"gnutls-cli gave {len(buf)} of {n} bytes")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError(f"gnutls-cli exited after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def main():
    sock_path, credentials, priority, logfile = sys.argv[1:5]
    kind, _, rest = credentials.partition(":")
    if kind == "psk":
        user, _, key = rest.partition(":")
        credential_args = ["--pskusername", user, "--pskkey", key]
    elif kind == "x509":
        credential_args = ["--x509cafile", rest, "--verify-hostname", "localhost"]
    else:
        print("unknown credentials", credentials, file=sys.stderr)
        return 2
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    result = {}
    t = threading.Thread(target=relay, args=(listener, sock_path, result), daemon=True)
    t.start()
    # Errors go to stderr, informational lines to the log file: stdout is only session data.
    errfile = open(logfile + ".err", "wb")
    proc = subprocess.Popen(
        ["gnutls-cli", "127.0.0.1", "-p", str(port), *credential_args,
         "--priority", priority, "--logfile", logfile],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errfile)
    try:
        # NBD_OPT_GO for the default export, no info requests.
        go = struct.pack(">IH", 0, 0)
        proc.stdin.write(struct.pack(">QII", OPT_MAGIC, OPT_GO, len(go)) + go)
        proc.stdin.flush()
        while True:
            magic, opt, typ, length = struct.unpack(">QIII", read_stdout(proc, 20))
            assert magic == REPLY_MAGIC and opt == OPT_GO, (hex(magic), opt)
            read_stdout(proc, length)
            if typ == REP_ACK:
                break
            assert typ & 0x80000000 == 0, f"GO failed: {typ:#x}"
        # NBD_CMD_READ of 512 bytes at 0: a simple reply (no structured replies negotiated).
        proc.stdin.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 42, 0, 512))
        proc.stdin.flush()
        magic, err, cookie = struct.unpack(">IIQ", read_stdout(proc, 16))
        assert (magic, err, cookie) == (0x67446698, 0, 42), (hex(magic), err, cookie)
        data = read_stdout(proc, 512)
        # NBD_CMD_DISC, then let gnutls-cli end the session.
        proc.stdin.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 43, 0, 0))
        proc.stdin.close()
        proc.wait(timeout=10)
        with open(logfile, errors="replace") as f:
            desc = [line.strip() for line in f if "Description" in line]
        print("ok", desc[0] if desc else "?", data[:16].hex())
    except (EOFError, TimeoutError, BrokenPipeError) as e:
        proc.kill()
        proc.wait()
        with open(logfile, errors="replace") as f:
            log = f.read()
        with open(logfile + ".err", errors="replace") as f:
            log += f.read()
        if result.get("starttls") and "Handshake was completed" not in log:
            print("refused:", repr(e), "|", " ".join(log.split())[-300:])
            return 0
        print("failed:", repr(e), result, log[-2000:], file=sys.stderr)
        return 1
    if "error" in result:
        print("relay failed:", result["error"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
