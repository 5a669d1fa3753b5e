#!/usr/bin/env python3
"""A scripted stand-in for `skopeo experimental-image-proxy`, for protocol edge cases only.

It speaks the real wire format on the inherited SOCK_SEQPACKET socket (`--sockfd N`) and misbehaves
as the FAKE_SCENARIO environment variable says. Real behaviour is tested against real skopeo.
"""
import json
import os
import socket
import sys
import tempfile
import time

scenario = os.environ.get("FAKE_SCENARIO", "normal")
version = os.environ.get("FAKE_VERSION", "0.2.8")
argv = sys.argv[1:]
sockfd = int(argv[argv.index("--sockfd") + 1]) if "--sockfd" in argv else 0
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=sockfd)
# Let replies larger than the default socket buffer through (root only; best effort).
try:
    sock.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE
except OSError:
    pass

if scenario == "exit-at-start":
    sys.stderr.write("fake-skopeo: refusing to start\n")
    sys.exit(3)


def reply(value=None, success=True, error="", pipeid=0, fds=(), raw=None):
    data = raw if raw is not None else json.dumps(
        {"success": success, "value": value, "pipeid": pipeid, "error": error}
    ).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def pipe_with(content):
    r, w = os.pipe()
    os.write(w, content)
    return r, w


pending = []  # write ends kept open until FinishPipe, as the real server does
writers = []  # writer processes FinishPipe waits for (scenario "endless")


def write_endless(w, n):
    """The declared n bytes, then (after FAKE_HOLD seconds) zeros forever; the total goes to FAKE_LOG.

    Returns once the reader closed its end (EPIPE), where skopeo's writer fails."""
    written = 0
    try:
        os.write(w, b"b" * n)
        written = n
        time.sleep(float(os.environ.get("FAKE_HOLD", "0")))
        zeros = bytes(64 * 1024)
        while True:
            written += os.write(w, zeros)
    except OSError:
        if os.environ.get("FAKE_LOG"):
            with open(os.environ["FAKE_LOG"], "a") as log:
                log.write("written %d\n" % written)
calls = {}


def log_call(method):
    """Counts calls per method, and appends them to FAKE_LOG when set (tests read it)."""
    calls[method] = calls.get(method, 0) + 1
    if os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write(method + "\n")
    return calls[method]


def foreign_fd(kind):
    """An fd of `kind` that is not a pipe, for a reply that should carry pipes only (scenario "notpipe")."""
    if kind == "file":
        fd, path = tempfile.mkstemp(prefix="cip-notpipe-")
        os.write(fd, b"f" * 100000)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd, [fd], path
    if kind == "dir":
        path = tempfile.mkdtemp(prefix="cip-notpipe-")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        return fd, [fd], path
    if kind == "socket":
        a, b = socket.socketpair()
        b.send(b"s" * 1000)
        return a.fileno(), [a.detach(), b.detach()], None
    fd = os.open("/dev/" + kind, os.O_RDONLY)  # "zero" or "null"
    return fd, [fd], "/dev/" + kind


while True:
    try:
        msg = sock.recv(1 << 16)
    except ConnectionResetError:
        break
    if not msg:
        break
    req = json.loads(msg)
    method, args = req["method"], req["args"]
    if method == "Initialize":
        reply(version)
        continue
    if method == "Shutdown":
        break
    if method == "FinishPipe":
        for w in pending:
            os.close(w)
        pending.clear()
        # Like the real server, wait for the writer and return its error.
        failed = False
        for pid in writers:
            _, status = os.waitpid(pid, 0)
            failed = failed or status != 0
        writers.clear()
        if failed:
            reply(success=False, error="write |1: broken pipe")
        else:
            reply(None)
        continue
    if scenario == "notpipe" and method == os.environ["FAKE_FD_ON"] and log_call(method) == 1:
        # The first call of FAKE_FD_ON gets an fd of kind FAKE_FD_KIND where a pipe belongs (in slot
        # FAKE_FD_SLOT of GetRawBlob's two); later calls are served normally. FAKE_FD_PATH receives
        # the path the fd points to, for the test to look for it among its own fds.
        bad, owned, path = foreign_fd(os.environ["FAKE_FD_KIND"])
        if os.environ.get("FAKE_FD_PATH"):
            with open(os.environ["FAKE_FD_PATH"], "w") as out:
                out.write(path or "")
        if method == "GetRawBlob":
            r, w = os.pipe()
            os.close(w)
            fds = [bad, r] if os.environ.get("FAKE_FD_SLOT", "0") == "0" else [r, bad]
            reply(int(os.environ.get("FAKE_RAW_BYTES", "200000")), fds=fds)
            owned.append(r)
        elif method == "GetBlob":
            reply(int(args[2]), pipeid=bad, fds=[bad])
        else:
            reply(1, fds=[bad])
        for fd in owned:
            os.close(fd)
        # The client's fd (if still open) now points to "PATH (deleted)": nothing is left behind.
        if path and path.startswith(tempfile.gettempdir()):
            (os.rmdir if os.path.isdir(path) else os.unlink)(path)
    elif scenario == "slow" and method == "OpenImage":
        time.sleep(float(os.environ.get("FAKE_DELAY", "1.5")))
        reply(1)
    elif scenario == "hang" and method == "OpenImage":
        time.sleep(3600)
    elif scenario == "nonjson" and method == "OpenImage":
        reply(raw=b"this is not json {")
    elif scenario == "wrongtype" and method == "OpenImage":
        reply("one")
    elif scenario == "extrafds" and method == "OpenImage":
        r1, w1 = pipe_with(b"x")
        r2, w2 = pipe_with(b"y")
        reply(1, fds=[r1, r2])
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    elif scenario == "missingfd" and method == "GetManifest":
        reply("sha256:" + "0" * 64, pipeid=7)
    elif scenario == "nopipeid" and method == "GetManifest":
        r, w = pipe_with(b"{}")
        reply("sha256:" + "0" * 64, pipeid=0, fds=[r])
        os.close(r)
        os.close(w)
    elif scenario == "oversized" and method == "OpenImage":
        reply(raw=json.dumps({"success": True, "value": 1, "pad": "x" * (2 << 20)}).encode())
    elif scenario == "biglayers" and method == "GetLayerInfo":
        layers = [
            {"digest": "sha256:%064x" % i, "size": 1000 + i, "media_type": "application/vnd.oci.image.layer.v1.tar+gzip"}
            for i in range(400)
        ]
        reply(layers)
    elif scenario == "badlayers" and method == "GetLayerInfo":
        reply([{"digest": 5, "size": "big"}])
    elif scenario == "failed" and method == "OpenImage":
        sock.send(json.dumps({"success": False, "value": None, "pipeid": 0, "error": "no such image",
                              "error_code": "other"}).encode())
    elif scenario == "die-mid-request" and method == "OpenImage":
        sys.stderr.write("fake-skopeo: dying in the middle of OpenImage\n")
        sys.stderr.flush()
        os._exit(7)
    elif scenario == "die-mid-blob" and method == "GetBlob":
        r, w = os.pipe()
        os.write(w, b"z" * 1000)
        reply(int(args[2]), pipeid=w, fds=[r])
        os.close(r)
        sys.stderr.write("fake-skopeo: dying in the middle of a blob\n")
        sys.stderr.flush()
        os._exit(9)
    elif scenario == "stall" and method == "GetBlob":
        # 1000 bytes, then nothing: a registry that stopped sending mid-blob.
        r, w = os.pipe()
        os.write(w, b"s" * 1000)
        reply(int(args[2]), pipeid=w, fds=[r])
        os.close(r)
        pending.append(w)
    elif scenario == "flaky-open" and method == "OpenImage":
        count = log_call(method)
        if count <= int(os.environ.get("FAKE_FAILURES", "2")):
            sock.send(json.dumps({"success": False, "value": None, "pipeid": 0, "error_code": "retryable",
                                  "error": "reading manifest: received unexpected HTTP status: 503"}).encode())
        else:
            reply(1)
    elif scenario == "endless" and method == "GetBlob":
        # A source that sends the declared bytes, then never ends (FAKE_SIZE_UNKNOWN: replies -1).
        n = int(args[2])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            write_endless(w, n)
            os._exit(1)
        writers.append(pid)
        reply(-1 if os.environ.get("FAKE_SIZE_UNKNOWN") else n, pipeid=w, fds=[r])
        os.close(r)
        pending.append(w)
    elif scenario == "endless" and method == "GetRawBlob":
        n = int(os.environ.get("FAKE_RAW_BYTES", "200000"))
        r, w = os.pipe()
        er, ew = os.pipe()
        reply(-1 if os.environ.get("FAKE_SIZE_UNKNOWN") else n, fds=[r, er])
        os.close(r)
        os.close(er)
        pid = os.fork()
        if pid == 0:
            write_endless(w, n)
            os.write(ew, json.dumps({"code": "EPIPE", "message": "write |1: broken pipe"}).encode())
            os._exit(1)
        os.close(w)
        os.close(ew)
    elif method == "GetRawBlob":
        # FAKE_RAW: "ok" (all bytes), "flaky" (first FAKE_FAILURES copies break halfway with a retryable
        # error), "corrupt" (wrong bytes), "stall" (half, then nothing on the first copy).
        count = log_call(method)
        n = int(os.environ.get("FAKE_RAW_BYTES", "200000"))
        data = bytes((i * 7) & 0xFF for i in range(n))
        mode = os.environ.get("FAKE_RAW", "ok")
        failing = count <= int(os.environ.get("FAKE_FAILURES", "1"))
        r, w = os.pipe()
        er, ew = os.pipe()
        reply(n, fds=[r, er])
        os.close(r)
        os.close(er)
        pid = os.fork()
        if pid == 0:
            try:
                if mode == "corrupt":
                    os.write(w, bytes(n))
                elif mode in ("flaky", "stall") and failing:
                    os.write(w, data[: n // 2])
                    if mode == "stall":
                        # Hold the pipe open without writing, for as long as the fake itself lives.
                        parent = os.getppid()
                        while os.getppid() == parent:
                            time.sleep(0.05)
                        os._exit(0)
                    os.write(ew, json.dumps({"code": "retryable", "message": "connection reset by peer"}).encode())
                else:
                    os.write(w, data)
            except OSError:
                pass
            os._exit(0)
        os.close(w)
        os.close(ew)
    elif method == "OpenImage" or method == "OpenImageOptional":
        reply(1)
    elif method == "CloseImage":
        reply(None)
    elif method == "GetBlob":
        # Declares the requested size but writes FAKE_BLOB_BYTES bytes.
        n = int(os.environ.get("FAKE_BLOB_BYTES", str(int(args[2]))))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.write(w, b"b" * n)
            except OSError:
                pass
            os._exit(0)
        reply(int(args[2]), pipeid=w, fds=[r])
        os.close(r)
        pending.append(w)
    else:
        reply(success=False, error="fake: unsupported method " + method)
