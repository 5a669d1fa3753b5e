#!/usr/bin/env python3
"""A scripted peer for the transport conformance suite (tests/transport_test.ts).

Started as the "skopeo" command with `--sockfd N [--authfd M]`, it reads one JSON command per packet
on the inherited SOCK_SEQPACKET socket and answers with raw packets and SCM_RIGHTS fds, as the suite
asks. It knows nothing of the image proxy protocol: it tests the transport, not the core.
"""
import hashlib
import json
import os
import signal
import socket
import sys
import time

argv = sys.argv[1:]
sockfd = int(argv[argv.index("--sockfd") + 1])
authfd = int(argv[argv.index("--authfd") + 1]) if "--authfd" in argv else None
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=sockfd)
try:
    sock.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE, for the oversized reply (root only)
except OSError:
    pass

held = []  # write ends of pipes sent with data still to come
ignore_eof = False


def reply(value, fds=(), pad=0):
    data = json.dumps({"value": value, "pad": "x" * pad}).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def pipe_with(content, keep_open=False):
    r, w = os.pipe()
    os.write(w, content)
    if keep_open:
        held.append(w)
    else:
        os.close(w)
    return r


def send_and_close(value, fds, pad=0):
    reply(value, fds, pad)
    for fd in fds:
        os.close(fd)


while True:
    msg = sock.recv(1 << 16)
    if not msg:
        break
    cmd = json.loads(msg)
    op = cmd["op"]
    time.sleep(cmd.get("delay", 0))
    if op == "echo":
        # N pipes, pipe i holding "pipe i", each already at end of file after it.
        send_and_close(op, [pipe_with(b"pipe %d" % i) for i in range(cmd["fds"])])
    elif op == "stall":
        # A pipe holding 1000 bytes whose writer stays, silent, until "feed".
        send_and_close(op, [pipe_with(b"s" * 1000, keep_open=True)])
    elif op == "feed":
        for w in held:
            try:
                os.write(w, b"f" * 1000)
            except OSError:
                pass
        reply(op)
    elif op == "write-end":
        # The write end of a pipe whose read end is closed: polling it reports an error, and reading
        # it fails (EBADF), again and again.
        r, w = os.pipe()
        os.close(r)
        send_and_close(op, [w])
    elif op == "not-pipe":
        # A pipe, then an fd of another kind ("file" or "dir": cmd["path"]; "zero", "null", "socket").
        kind = cmd["kind"]
        if kind == "socket":
            a, b = socket.socketpair()
            b.send(b"s" * 1000)
            other = [a.detach(), b.detach()]
        elif kind == "dir":
            other = [os.open(cmd["path"], os.O_RDONLY | os.O_DIRECTORY)]
        else:
            other = [os.open(cmd["path"] if kind == "file" else "/dev/" + kind, os.O_RDONLY)]
        send_and_close(op, [pipe_with(b"p"), other[0]])
        for fd in other[1:]:
            os.close(fd)
    elif op == "full":
        r, w = os.pipe()
        os.set_blocking(w, False)
        written = 0
        try:
            while True:
                written += os.write(w, b"z" * 4096)
        except BlockingIOError:
            pass
        held.append(w)
        send_and_close(written, [r])
    elif op == "many":
        send_and_close(op, [pipe_with(b"m") for _ in range(cmd["fds"])])
    elif op == "big":
        send_and_close(op, [pipe_with(b"b") for _ in range(cmd["fds"])], pad=2 << 20)
    elif op == "auth":
        if authfd is None:
            reply(None)
        else:
            data = os.pread(authfd, 1 << 24, 0)
            reply({"length": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    elif op == "exit":
        # Ends without a reply, after saying why on stderr.
        sys.stderr.write(cmd.get("stderr", "") + "\n")
        sys.stderr.flush()
        os._exit(cmd["code"])
    elif op == "ignore-eof":
        # From now on, end of file on the socket does not end this peer; nor does SIGTERM.
        ignore_eof = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reply(op)
    else:
        reply("unknown op " + op)

while ignore_eof:
    time.sleep(3600)
