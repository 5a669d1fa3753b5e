/**
 * The Node adapter: libc through `koffi` (npm; prebuilt, no compiler) for the socketpair, SCM_RIGHTS
 * and `splice`, and `node:child_process` for the child, which inherits its socket and auth memfd at
 * fds 3 and 4. Node has neither FFI nor fd passing of its own, and libuv knows no SOCK_SEQPACKET.
 *
 * No call holds the event loop. A reply is first awaited on the JS thread itself, for at most a
 * quarter of a millisecond; then `recvmsg` waits as a koffi asynchronous call on libuv's thread pool.
 * Pipes are read from the event loop by `node:net` (libuv's own pipe reader, with backpressure), and a
 * blob saved to a file is moved with `splice(SPLICE_F_NONBLOCK)`, retried on a short timer while its
 * pipe is empty: neither ever pins a pool thread on a pipe that may stall, since libuv's pool has only
 * four threads unless `UV_THREADPOOL_SIZE` says otherwise, and `node:fs` needs them too.
 *
 * What every adapter shares (the request steps, the reply check, the spawn, close and kill) is in
 * `posix.ts`; this file holds only Node's side of it, in the order of {@linkcode PosixRuntime}.
 * `koffi` is loaded only here, so Deno and Bun never import it.
 *
 * @module
 */

import { spawn as spawnChild } from "node:child_process";
import type { Readable } from "node:stream";
import koffi from "koffi";
import { cannotStart } from "../errors.ts";
import type { FdStreamOptions, Hasher, SpawnRequest, TransportFactory } from "../transport.ts";
import { F_SETPIPE_SZ } from "./libc.ts";
import { type NowCalls, pollFileSink } from "./poll.ts";
import { type PoolReceiveCalls, PoolReceiver } from "./pool.ts";
import {
  type ChildProcess,
  type InheritedFds,
  type PosixRuntime,
  posixTransportFactory,
  readStderr,
  type Syscalls,
} from "./posix.ts";
import { socketStream } from "./socket-stream.ts";
import { type ExtractCalls, extractCallsOver } from "./extract-calls.ts";

// ---- FFI binding ----

/** C prototypes; every buffer is a `void *`, so koffi passes the typed array's own memory. */
const SYMBOLS = {
  socketpair: "int socketpair(int, int, int, void *)",
  send: "long send(int, const void *, size_t, int)",
  recvmsg: "long recvmsg(int, void *, int)",
  read: "long read(int, void *, size_t)",
  write: "long write(int, const void *, size_t)",
  close: "int close(int)",
  sched_yield: "int sched_yield()",
  shutdown: "int shutdown(int, int)",
  fcntl: "int fcntl(int, int, int)",
  ioctl: "int ioctl(int, unsigned long, void *)",
  memfd_create: "int memfd_create(const void *, unsigned int)",
  open: "int open(const void *, int, int)",
  splice: "long splice(int, void *, int, void *, size_t, unsigned int)",
  strerror: "const char *strerror(int)",
} as const;

/** A bound libc function: called on the JS thread, or with `.async(...args, callback)` on the pool. */
type Func = ReturnType<ReturnType<typeof koffi.load>["func"]>;
type Libc = Record<keyof typeof SYMBOLS, Func>;

function bindSyscalls(lib: Libc): Syscalls {
  return {
    socketpair: lib.socketpair,
    send: (fd, data, flags) => Number(lib.send(fd, data, data.length, flags)),
    write: (fd, data) => Number(lib.write(fd, data, data.length)),
    close: lib.close,
    shutdown: lib.shutdown,
    fcntl: lib.fcntl,
    ioctl: lib.ioctl,
    memfd_create: lib.memfd_create,
    open: lib.open,
    sched_yield: lib.sched_yield,
    // koffi saves errno right after each call on the JS thread, before V8 can change it.
    errno: () => koffi.errno(),
    strerror: (errno) => lib.strerror(errno) ?? `errno ${errno}`,
  };
}

/** Runs `func` on libuv's thread pool; a pending call keeps the program alive, as it should. */
function later(func: Func, ...args: unknown[]): Promise<number> {
  return new Promise((resolve, reject) => {
    func.async(...args, (err: unknown, result: number | bigint) => {
      if (err) reject(err);
      else resolve(Number(result));
    });
  });
}

function bindPool(lib: Libc): PoolReceiveCalls {
  return {
    recvmsg: (fd, msghdr, flags) => later(lib.recvmsg, fd, msghdr, flags),
    recvmsgNow: (fd, msghdr, flags) => Number(lib.recvmsg(fd, msghdr, flags)),
  };
}

function bindNow(lib: Libc): NowCalls {
  return {
    read: (fd, buffer) => Number(lib.read(fd, buffer, buffer.length)),
    splice: (fdIn, fdOut, length, flags) => Number(lib.splice(fdIn, null, fdOut, null, length, flags)),
  };
}

// ---- Receiving ----

// Replies are received by pool.ts's PoolReceiver: a look on the JS thread, then a wait on the pool.

/** The address `recvmsg` is given for a view of the receive buffers (its `byteOffset` included). */
function addressOf(view: Uint8Array): bigint {
  return koffi.address(view);
}

// ---- Pipes ----

function openStream(sys: Syscalls, fd: number, options: FdStreamOptions): ReadableStream<Uint8Array> {
  // A blob pipe grows first: skopeo then writes more before it blocks.
  if (options.pipeSize) sys.fcntl(fd, F_SETPIPE_SZ, options.pipeSize);
  // Every pipe, payload or blob, busy reader or not, is read by libuv from the event loop: a pool read
  // would hold one of libuv's four threads for as long as skopeo takes to write.
  return socketStream(fd);
}

function createHasher(): Hasher | undefined {
  // The core's own fallback is node:crypto, which is Node's native hash: nothing better to offer.
  return undefined;
}

// ---- Spawn ----

/** The fd numbers the child gets: its socket end, then the auth memfd. */
const CHILD_SOCKET_FD = 3;
const CHILD_AUTH_FD = 4;

function launch(request: SpawnRequest, fds: InheritedFds): ChildProcess {
  const argv = request.argv({
    sockfd: CHILD_SOCKET_FD,
    authfd: fds.auth === undefined ? undefined : CHILD_AUTH_FD,
  });
  // libuv dup2()s the numbered stdio entries onto fds 3 and 4 in the child only: ours stay
  // close-on-exec, so no other child ever inherits them. It forks from this (the main) thread, which
  // matters for setpriv --pdeathsig: the signal fires when the spawning thread exits.
  const stdio: ("ignore" | "inherit" | "pipe" | number)[] = [
    "ignore",
    "ignore",
    request.debug ? "inherit" : "pipe",
    fds.socket,
  ];
  if (fds.auth !== undefined) stdio.push(fds.auth);
  let child: ReturnType<typeof spawnChild>;
  try {
    child = spawnChild(argv[0], argv.slice(1), { stdio, env: { ...process.env, ...request.env } });
  } catch (err) {
    throw cannotStart(argv, err);
  }
  // A command that cannot be run is reported by an "error" event, later; the missing pid says so now.
  child.on("error", () => {});
  if (child.pid === undefined) {
    throw cannotStart(argv, new Error("no such file, not executable, or no process left to start it"));
  }
  const stderrPipe = child.stderr as (Readable & { ref(): void; unref(): void }) | null;
  const status = new Promise<{ code: number | null; signal: string | null }>((resolve) => {
    child.once("exit", (code, signal) => resolve({ code: signal ? null : code, signal: signal ?? null }));
  });
  return {
    pid: child.pid,
    status,
    stderr: stderrPipe ? readStderr(stderrPipe) : undefined,
    kill: (signal) => void child.kill(signal),
    // The stderr pipe is a handle of its own: it must not keep an idle proxy's program alive either.
    ref: () => {
      child.ref();
      stderrPipe?.ref();
    },
    unref: () => {
      child.unref();
      stderrPipe?.unref();
    },
  };
}

// ---- Factory ----

let runtime: PosixRuntime | undefined;

function bindRuntime(): PosixRuntime {
  if (runtime) return runtime;
  const libc = koffi.load("libc.so.6");
  const lib = Object.fromEntries(
    Object.entries(SYMBOLS).map(([name, prototype]) => [name, libc.func(prototype)]),
  ) as Libc;
  const sys = bindSyscalls(lib);
  const pool = bindPool(lib);
  const now = bindNow(lib);
  runtime = {
    syscalls: sys,
    receiver: (socket) => new PoolReceiver(pool, sys, socket, addressOf),
    openStream: (fd, options) => openStream(sys, fd, options),
    fileSink: (pipe, file) => pollFileSink(now, sys, pipe, file),
    createHasher,
    launch,
  };
  return runtime;
}

/**
 * The Node transport factory; {@linkcode ImageProxy.spawn} picks it automatically under Node.
 *
 * @example Passing it explicitly
 * ```ts ignore
 * import { ImageProxy } from "../../mod.ts";
 * import { nodeTransport } from "./node.ts";
 * await using proxy = await ImageProxy.spawn({ transport: nodeTransport });
 * console.log(proxy.protocolVersion);
 * ```
 */
export const nodeTransport: TransportFactory = posixTransportFactory(
  bindRuntime,
  (name) => process.env[name],
);

// ---- Extraction ----

/**
 * The extraction's calls with nanosecond times and extended attributes.
 *
 * @returns the calls, bound to libc.
 */
export function extractCalls(): ExtractCalls | undefined {
  const libc = koffi.load("libc.so.6");
  const utimensat = libc.func("int utimensat(int, const void *, const void *, int)");
  const lsetxattr = libc.func("int lsetxattr(const void *, const void *, const void *, size_t, int)");
  const strerror = libc.func("const char *strerror(int)");
  return extractCallsOver({
    utimensat: (dirfd, path, times, flags) => utimensat(dirfd, path, times, flags),
    lsetxattr: (path, name, value, size, flags) => lsetxattr(path, name, value, size, flags),
    // koffi saves errno right after each call on the JS thread, before V8 can change it.
    errno: () => koffi.errno(),
    strerror: (errno) => strerror(errno) ?? `errno ${errno}`,
  });
}
