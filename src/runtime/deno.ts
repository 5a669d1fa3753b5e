/**
 * The Deno adapter: libc through `Deno.dlopen` for the socketpair, SCM_RIGHTS and pipe reads, and
 * `Deno.Command` for the child. Blob pipes are read from the event loop by `node:net`, which can take
 * over a pipe fd. Blocking calls (`recvmsg`, the reads of small pipes and of raw blobs this client
 * hashes, and `splice` and `fsync` for blobs saved to files) run as nonblocking FFI calls on Deno's
 * blocking thread pool, so the event loop stays free while skopeo works. A reply is first awaited on
 * the JS thread itself, for at most a quarter of a millisecond, since most come sooner than a
 * thread-pool hop would.
 *
 * What every adapter shares (the request steps, the reply check, the spawn, close and kill) is in
 * `posix.ts`; this file holds only Deno's side of it, in the order of {@linkcode PosixRuntime}.
 *
 * Permissions: `--allow-ffi` (libc), `--allow-run` (skopeo), `--allow-env` (reading
 * `CONTAINERS_IMAGE_PROXY_DEBUG`; the child inherits the environment).
 *
 * @module
 * @tags allow-ffi, allow-run, allow-env
 */

import { createHash } from "node:crypto";
import { cannotStart } from "../errors.ts";
import type { FdStreamOptions, Hasher, SpawnRequest, TransportFactory } from "../transport.ts";
import { F_GETFD, F_SETFD, F_SETPIPE_SZ, FD_CLOEXEC } from "./libc.ts";
import { BLOB_READ, type PoolCalls, poolFileSink, PoolReceiver, poolStream, SMALL_READ } from "./pool.ts";
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

const SYMBOLS = {
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "isize", nonblocking: true },
  recvmsgNow: { name: "recvmsg", parameters: ["i32", "buffer", "i32"], result: "isize" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize", nonblocking: true },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  writeLater: { name: "write", parameters: ["i32", "buffer", "usize"], result: "isize", nonblocking: true },
  close: { parameters: ["i32"], result: "i32" },
  sched_yield: { parameters: [], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  splice: {
    parameters: ["i32", "pointer", "i32", "pointer", "usize", "u32"],
    result: "isize",
    nonblocking: true,
  },
  spliceNow: {
    name: "splice",
    parameters: ["i32", "pointer", "i32", "pointer", "usize", "u32"],
    result: "isize",
  },
  fsync: { parameters: ["i32"], result: "i32", nonblocking: true },
  fsyncNow: { name: "fsync", parameters: ["i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" },
} as const;

type Libc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

/**
 * Deno does not count a pending nonblocking FFI call as work that keeps the program alive, so a
 * program awaiting only a reply would exit. A ref'd timer is held while any such call is pending.
 */
let pendingCalls = 0;
let keepAlive: number | undefined;
async function whilePending<T>(call: Promise<T>): Promise<T> {
  if (pendingCalls++ === 0) {
    // One timer for the process, ref'd and unref'd: cheaper than a new timer per call.
    keepAlive ??= setInterval(() => {}, 1 << 30) as unknown as number;
    Deno.refTimer(keepAlive);
  }
  try {
    return await call;
  } finally {
    if (--pendingCalls === 0) Deno.unrefTimer(keepAlive!);
  }
}

function bindSyscalls(lib: Libc): Syscalls {
  return {
    socketpair: lib.socketpair,
    send: (fd, data, flags) => Number(lib.send(fd, data, BigInt(data.length), flags)),
    write: (fd, data) => Number(lib.write(fd, data, BigInt(data.length))),
    close: lib.close,
    shutdown: lib.shutdown,
    fcntl: lib.fcntl,
    ioctl: (fd, request, argument) => lib.ioctl(fd, BigInt(request), argument),
    memfd_create: lib.memfd_create,
    open: lib.open,
    sched_yield: lib.sched_yield,
    errno: () => {
      const location = lib.__errno_location();
      return location ? new Deno.UnsafePointerView(location).getInt32() : 0;
    },
    strerror: (errno) => {
      const text = lib.strerror(errno);
      return text ? Deno.UnsafePointerView.getCString(text) : `errno ${errno}`;
    },
  };
}

function bindPool(lib: Libc): PoolCalls {
  return {
    recvmsg: async (fd, msghdr, flags) => Number(await whilePending(lib.recvmsg(fd, msghdr, flags))),
    recvmsgNow: (fd, msghdr, flags) => Number(lib.recvmsgNow(fd, msghdr, flags)),
    read: async (fd, buffer) => Number(await whilePending(lib.read(fd, buffer, BigInt(buffer.length)))),
    write: async (fd, data) => Number(await whilePending(lib.writeLater(fd, data, BigInt(data.length)))),
    splice: async (fdIn, fdOut, length, flags) =>
      Number(await whilePending(lib.splice(fdIn, null, fdOut, null, BigInt(length), flags))),
    fsync: (fd) => whilePending(lib.fsync(fd)),
    spliceNow: (fdIn, fdOut, length, flags) =>
      Number(lib.spliceNow(fdIn, null, fdOut, null, BigInt(length), flags)),
    fsyncNow: lib.fsyncNow,
  };
}

// ---- Receiving ----

// Replies are received by pool.ts's PoolReceiver: a look on the JS thread, then a wait on the pool.

/** The address `recvmsg` is given for a view of the receive buffers. */
function addressOf(view: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(view)));
}

// ---- Pipes ----

/**
 * The three readers of a received pipe, each for a reason:
 * - `"event-loop"`: a blob pipe (`pipeSize` given) whose reader does little per chunk. `node:net`
 *   reads it from the event loop when epoll says so, with no thread-pool hop per read (see
 *   `socketStream`): the fastest way for getBlob.
 * - `"pool-blob"`: a blob pipe whose reader hashes every chunk on the JS thread (`readerBusy`, a raw
 *   blob). Reads of up to 192 KiB on the thread pool leave that thread to the hashing, and beat
 *   `node:net`'s 64 KiB reads there (1.06 vs 0.81 GiB/s).
 * - `"pool-small"`: a payload pipe (manifest, configuration, layer info, a raw blob's error fd) that
 *   holds a few KiB at most: 64 KiB pool reads, with no socket object set up around it.
 */
type PipeReader = "event-loop" | "pool-blob" | "pool-small";

/** Picks the reader of a pipe from what the core says about it. */
function choosePipeReader(options: FdStreamOptions): PipeReader {
  if (!options.pipeSize) return "pool-small";
  return options.readerBusy ? "pool-blob" : "event-loop";
}

function openStream(
  pool: PoolCalls,
  sys: Syscalls,
  fd: number,
  options: FdStreamOptions,
): ReadableStream<Uint8Array> {
  const reader = choosePipeReader(options);
  // A blob pipe grows first, whichever reader: skopeo then writes more before it blocks.
  const size = options.pipeSize ? sys.fcntl(fd, F_SETPIPE_SZ, options.pipeSize) : 0;
  if (reader === "event-loop") return socketStream(fd);
  const readSize = reader === "pool-blob" && size > 0 ? Math.min(size, BLOB_READ) : SMALL_READ;
  return poolStream(pool, sys, fd, readSize);
}

function createHasher(algorithm: string): Hasher | undefined {
  if (algorithm !== "sha256" && algorithm !== "sha512") return undefined;
  const hash = createHash(algorithm);
  return {
    update: (data) => void hash.update(data),
    hexDigest: () => hash.digest("hex"),
  };
}

// ---- Spawn ----

function setCloexec(sys: Syscalls, fd: number, on: boolean): void {
  const flags = sys.fcntl(fd, F_GETFD, 0);
  sys.fcntl(fd, F_SETFD, on ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC);
}

function launch(sys: Syscalls, request: SpawnRequest, fds: InheritedFds): ChildProcess {
  const inherited = fds.auth === undefined ? [fds.socket] : [fds.socket, fds.auth];
  const argv = request.argv({ sockfd: fds.socket, authfd: fds.auth });
  let child: Deno.ChildProcess;
  // Deno.Command has no way to map fds, but a child inherits every fd without FD_CLOEXEC. Clearing
  // it, spawning and setting it again happen in one synchronous run, so no other spawn from this
  // thread can inherit the fds in between.
  for (const fd of inherited) setCloexec(sys, fd, false);
  try {
    child = new Deno.Command(argv[0], {
      args: argv.slice(1),
      env: request.env,
      stdin: "null",
      stdout: "null",
      stderr: request.debug ? "inherit" : "piped",
    }).spawn();
  } catch (err) {
    throw cannotStart(argv, err);
  } finally {
    for (const fd of inherited) setCloexec(sys, fd, true);
  }
  return {
    pid: child.pid,
    status: child.status.then((status) => ({
      code: status.signal ? null : status.code,
      signal: status.signal ?? null,
    })),
    stderr: request.debug ? undefined : readStderr(child.stderr),
    kill: (signal) => child.kill(signal),
    ref: () => child.ref(),
    unref: () => child.unref(),
  };
}

// ---- Factory ----

let runtime: PosixRuntime | undefined;

function bindRuntime(): PosixRuntime {
  if (runtime) return runtime;
  const lib = Deno.dlopen("libc.so.6", SYMBOLS).symbols;
  const sys = bindSyscalls(lib);
  const pool = bindPool(lib);
  runtime = {
    syscalls: sys,
    receiver: (socket) => new PoolReceiver(pool, sys, socket, addressOf),
    openStream: (fd, options) => openStream(pool, sys, fd, options),
    fileSink: (pipe, file) => poolFileSink(pool, sys, pipe, file),
    createHasher,
    launch: (request, fds) => launch(sys, request, fds),
  };
  return runtime;
}

/**
 * The Deno transport factory; {@linkcode ImageProxy.spawn} picks it automatically under Deno.
 *
 * @example Passing it explicitly
 * ```ts ignore
 * import { ImageProxy } from "../../mod.ts";
 * import { denoTransport } from "./deno.ts";
 * await using proxy = await ImageProxy.spawn({ transport: denoTransport });
 * console.log(proxy.protocolVersion);
 * ```
 */
export const denoTransport: TransportFactory = posixTransportFactory(bindRuntime, (name) => {
  // Without --allow-env the variable is simply not set, as far as we can know.
  if (Deno.permissions.querySync({ name: "env", variable: name }).state !== "granted") return undefined;
  return Deno.env.get(name);
});

// ---- Extraction ----

const EXTRACT_SYMBOLS = {
  utimensat: { parameters: ["i32", "buffer", "buffer", "i32"], result: "i32" },
  lsetxattr: { parameters: ["buffer", "buffer", "buffer", "usize", "i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" },
} as const;

/**
 * The extraction's calls with nanosecond times and extended attributes, or `undefined` without
 * `--allow-ffi` (asked, never prompted for: extraction then does what `node:fs` can).
 *
 * @returns the calls, bound to libc, or `undefined`.
 */
export function extractCalls(): ExtractCalls | undefined {
  if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return undefined;
  const lib = Deno.dlopen("libc.so.6", EXTRACT_SYMBOLS).symbols;
  return extractCallsOver({
    utimensat: lib.utimensat,
    lsetxattr: (path, name, value, size, flags) => lib.lsetxattr(path, name, value, BigInt(size), flags),
    errno: () => {
      const location = lib.__errno_location();
      return location ? new Deno.UnsafePointerView(location).getInt32() : 0;
    },
    strerror: (errno) => {
      const text = lib.strerror(errno);
      return text ? Deno.UnsafePointerView.getCString(text) : `errno ${errno}`;
    },
  });
}
