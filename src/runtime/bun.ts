/**
 * The Bun adapter: libc through `bun:ffi` for the socketpair and SCM_RIGHTS, `Bun.spawn` for the child,
 * and Bun's own pipe reader for received pipes.
 *
 * `bun:ffi` calls are synchronous, so the one call that blocks, `recvmsg`, runs on a small worker thread
 * that owns nothing but that call: the shared layer's receive buffers live in a `SharedArrayBuffer`, the
 * worker sits in `recvmsg` on them, and hands each packet over with `Atomics.notify`, which resolves the
 * main thread's `Atomics.waitAsync`; a reply that comes within a quarter of a millisecond is seen sooner,
 * by the main thread watching the shared state word right after the send. Pipes need no thread at all:
 * `Bun.file(fd).stream()` reads them from Bun's event loop when they are readable, with backpressure, and
 * a blob saved to a file is moved with `splice(SPLICE_F_NONBLOCK)`, retried on a short timer while its
 * pipe is empty.
 *
 * What every adapter shares (the request steps, the reply check, the spawn, close and kill) is in
 * `posix.ts`; this file holds only Bun's side of it, in the order of {@linkcode PosixRuntime}.
 *
 * @module
 */

import { cannotStart, SpawnError } from "../errors.ts";
import type { FdStreamOptions, Hasher, SpawnRequest, TransportFactory } from "../transport.ts";
import type { BunFfi, BunGlobal, BunSubprocess, BunWorker } from "./bun-api.ts";
import {
  EINTR,
  F_SETPIPE_SZ,
  MSG_CMSG_CLOEXEC,
  O_CLOEXEC,
  parseScmRights,
  readMsghdr,
  resetMsghdr,
} from "./libc.ts";
import {
  type ChildProcess,
  type InheritedFds,
  packReceiveBuffers,
  type PosixRuntime,
  posixTransportFactory,
  type ReceiveBuffers,
  type Receiver,
  type StderrTail,
  type Syscalls,
  TailBuffer,
} from "./posix.ts";
import { type NowCalls, pollFileSink } from "./poll.ts";
import { type ExtractCalls, extractCallsOver } from "./extract-calls.ts";

// ---- FFI binding ----

const SYMBOLS = {
  socketpair: { args: ["i32", "i32", "i32", "ptr"], returns: "i32" },
  send: { args: ["i32", "ptr", "usize", "i32"], returns: "i64_fast" },
  write: { args: ["i32", "ptr", "usize"], returns: "i64_fast" },
  close: { args: ["i32"], returns: "i32" },
  sched_yield: { args: [], returns: "i32" },
  shutdown: { args: ["i32", "i32"], returns: "i32" },
  fcntl: { args: ["i32", "i32", "i32"], returns: "i32" },
  ioctl: { args: ["i32", "u64", "ptr"], returns: "i32" },
  memfd_create: { args: ["ptr", "u32"], returns: "i32" },
  pipe2: { args: ["ptr", "i32"], returns: "i32" },
  open: { args: ["ptr", "i32", "i32"], returns: "i32" },
  read: { args: ["i32", "ptr", "usize"], returns: "i64_fast" },
  splice: { args: ["i32", "ptr", "i32", "ptr", "usize", "u32"], returns: "i64_fast" },
  __errno_location: { args: [], returns: "ptr" },
  strerror: { args: ["i32"], returns: "ptr" },
} as const;

interface Libc {
  socketpair(domain: number, type: number, protocol: number, fds: Int32Array): number;
  send(fd: number, data: Uint8Array, length: number, flags: number): number | bigint;
  write(fd: number, data: Uint8Array, length: number): number | bigint;
  close(fd: number): number;
  sched_yield(): number;
  shutdown(fd: number, how: number): number;
  fcntl(fd: number, command: number, argument: number): number;
  ioctl(fd: number, request: number, argument: Int32Array): number;
  memfd_create(name: Uint8Array, flags: number): number;
  pipe2(fds: Int32Array, flags: number): number;
  open(path: Uint8Array, flags: number, mode: number): number;
  read(fd: number, buffer: Uint8Array, length: number): number | bigint;
  splice(
    fdIn: number,
    offIn: null,
    fdOut: number,
    offOut: null,
    length: number,
    flags: number,
  ): number | bigint;
  __errno_location(): number;
  strerror(errno: number): number;
}

let ffi: BunFfi | undefined;

/**
 * `bun:ffi`, loaded with Bun's synchronous `import.meta.require`: a static import would put the `bun:`
 * scheme into Deno's module graph, which type-checks this file.
 */
function loadFfi(): BunFfi {
  ffi ??= (import.meta as unknown as { require(id: string): BunFfi }).require("bun:ffi");
  return ffi;
}

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
    errno: () => loadFfi().read.i32(lib.__errno_location(), 0),
    strerror: (errno) => {
      const text = lib.strerror(errno);
      return text ? new (loadFfi().CString)(text).toString() : `errno ${errno}`;
    },
  };
}

function bindNow(lib: Libc): NowCalls {
  return {
    read: (fd, buffer) => Number(lib.read(fd, buffer, buffer.length)),
    splice: (fdIn, fdOut, length, flags) => Number(lib.splice(fdIn, null, fdOut, null, length, flags)),
  };
}

function bun(): BunGlobal {
  return (globalThis as unknown as { Bun: BunGlobal }).Bun;
}

// ---- Receiving ----

/** The receiver's state word: the worker may call `recvmsg` (the buffers are its). */
const ARMED = 0;
/** The receiver's state word: a result waits in the buffers (they are the main thread's). */
const READY = 1;
/** The receiver's state word: the worker must return. */
const STOP = 2;

/**
 * The worker threads' code, for two roles. As the receiver it knows no layouts: it calls `recvmsg` on a
 * `msghdr` the main thread packed, stores the result and errno (read on the thread that made the call,
 * so it means something) in the state words at the start of the shared memory, and waits until the
 * main thread has taken the packet and re-armed it. As the stderr reader it owns the read end of the
 * child's stderr pipe: it posts what it reads and closes the fd at end of file. Only `EINTR` is retried.
 */
const WORKER_SOURCE = `
import { dlopen, read } from "bun:ffi";
const { symbols: libc } = dlopen("libc.so.6", {
  recvmsg: { args: ["i32", "ptr", "i32"], returns: "i64_fast" },
  read: { args: ["i32", "ptr", "usize"], returns: "i64_fast" },
  close: { args: ["i32"], returns: "i32" },
  __errno_location: { args: [], returns: "ptr" },
});
const errno = () => read.i32(libc.__errno_location(), 0);
function readStderr(fd) {
  const buffer = new Uint8Array(65536);
  for (;;) {
    const n = Number(libc.read(fd, buffer, buffer.length));
    if (n < 0 && errno() === ${EINTR}) continue;
    if (n <= 0) break;
    postMessage(buffer.slice(0, n));
  }
  libc.close(fd);
  postMessage(null);
}
function receive(socket, msghdr, flags, shared) {
  const state = new Int32Array(shared, 0, 4);
  for (;;) {
    for (let s; (s = Atomics.load(state, 0)) !== ${ARMED};) {
      if (s === ${STOP}) return;
      Atomics.wait(state, 0, s);
    }
    const n = Number(libc.recvmsg(socket, msghdr, flags));
    const error = n < 0 ? errno() : 0;
    if (n < 0 && error === ${EINTR}) continue;
    state[1] = n;
    state[2] = error;
    Atomics.compareExchange(state, 0, ${ARMED}, ${READY});
    Atomics.notify(state, 0);
  }
}
self.onmessage = ({ data }) => {
  if (data.role === "stderr") readStderr(data.fd);
  else receive(data.socket, data.msghdr, data.flags, data.shared);
};
`;

let workerUrl: string | undefined;

/** A Blob URL rather than a file: it works the same inside `bun build --compile` binaries. */
function startWorker(): BunWorker {
  workerUrl ??= URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "application/javascript" }));
  const worker = new Worker(workerUrl) as BunWorker;
  worker.unref();
  return worker;
}

/**
 * Receives on a worker blocked in `recvmsg`: a look is a load of the shared state word, a wait is an
 * `Atomics.waitAsync` on it.
 */
class BunReceiver implements Receiver {
  readonly buffers: ReceiveBuffers;
  readonly #lib: Libc;
  readonly #socket: number;
  readonly #worker: BunWorker;
  /** `[state, n, errno, unused]`, at the start of the shared memory. */
  readonly #state: Int32Array;
  /** How many operations need the worker now; it keeps the program alive only while > 0. */
  #holds = 0;
  #stopped: Promise<void> | undefined;

  constructor(lib: Libc, socket: number) {
    this.#lib = lib;
    this.#socket = socket;
    const { ptr } = loadFfi();
    // One shared memory for everything recvmsg touches: it never moves and both threads see it.
    this.buffers = packReceiveBuffers(true, (view) => BigInt(ptr(view)));
    const shared = this.buffers.memory;
    this.#state = new Int32Array(shared, 0, 4);
    this.#worker = startWorker();
    this.#worker.onerror = () => {
      // A worker that failed to start (or died) must not leave a request waiting forever.
      this.#state[1] = -1;
      this.#state[2] = 0;
      Atomics.compareExchange(this.#state, 0, ARMED, READY);
      Atomics.notify(this.#state, 0);
    };
    this.#worker.postMessage({
      socket,
      msghdr: ptr(this.buffers.msghdrBytes),
      flags: MSG_CMSG_CLOEXEC,
      shared,
    });
  }

  receiveNow(): number | undefined {
    return Atomics.load(this.#state, 0) === READY ? this.#take() : undefined;
  }

  async receiveLater(): Promise<number> {
    this.#hold(1);
    try {
      await this.#ready();
      // stop() takes over a result that arrives after it started (and closes its fds).
      if (this.#stopped || Atomics.load(this.#state, 0) !== READY) throw new Error("The socket is closed");
      return this.#take();
    } finally {
      this.#hold(-1);
    }
  }

  release(): void {
    resetMsghdr(this.buffers.msghdr, this.buffers.control.length);
    Atomics.store(this.#state, 0, ARMED);
    Atomics.notify(this.#state, 0);
  }

  /**
   * Stops the worker once it is out of `recvmsg`, then closes the socket: never while the worker may
   * still use the fd number. A result that arrived meanwhile is dropped, its fds closed.
   */
  stop(): Promise<void> {
    this.#stopped ??= (async () => {
      this.#hold(1);
      try {
        // After shutdown() the pending recvmsg returns at once; a receive in progress re-arms it.
        while (Atomics.load(this.#state, 0) !== STOP) {
          await this.#ready();
          if (Atomics.load(this.#state, 0) !== READY) continue;
          if (this.#state[1] >= 0) {
            const header = readMsghdr(this.buffers.msghdr);
            for (const fd of parseScmRights(this.buffers.control, header.controlLength)) this.#lib.close(fd);
          }
          Atomics.store(this.#state, 0, STOP);
          Atomics.notify(this.#state, 0);
        }
        this.#lib.close(this.#socket);
        this.#worker.terminate();
      } finally {
        this.#hold(-1);
      }
    })();
    return this.#stopped;
  }

  /** The byte count of the result in the buffers; a failed receive re-arms the worker and throws. */
  #take(): number {
    const n = this.#state[1];
    if (n >= 0) return n;
    const errno = this.#state[2];
    this.release();
    throw new Error(`Receiving from the image proxy failed (errno ${errno})`);
  }

  /** Resolves once the worker has a result in the buffers (or was stopped). */
  async #ready(): Promise<void> {
    const state = this.#state;
    while (Atomics.load(state, 0) === ARMED) {
      const wait = Atomics.waitAsync(state, 0, ARMED);
      if (wait.async) await wait.value;
    }
  }

  #hold(delta: 1 | -1): void {
    this.#holds += delta;
    if (delta > 0 && this.#holds === 1) this.#worker.ref();
    if (delta < 0 && this.#holds === 0) this.#worker.unref();
  }
}

// ---- Pipes ----

function openStream(sys: Syscalls, fd: number, options: FdStreamOptions): ReadableStream<Uint8Array> {
  if (options.pipeSize) sys.fcntl(fd, F_SETPIPE_SZ, options.pipeSize);
  // Bun's reader reads from its own dup of the fd, from the event loop, when the pipe is readable.
  // Ours is still closed only once that reader has finished or been cancelled, so that no read can
  // ever meet a closed (or reused) fd number.
  let source: ReadableStreamDefaultReader<Uint8Array> | undefined;
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await source?.cancel().catch(() => {});
    sys.close(fd);
  };
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (closed) return;
      let result: ReadableStreamReadResult<Uint8Array>;
      try {
        source ??= bun().file(fd).stream().getReader();
        result = await source.read();
      } catch (err) {
        await close();
        controller.error(new Error(`Reading pipe fd ${fd} failed: ${(err as Error)?.message ?? err}`));
        return;
      }
      if (result.done) {
        await close();
        controller.close();
        return;
      }
      controller.enqueue(result.value);
    },
    cancel: close,
  }, { highWaterMark: 1 });
}

function createHasher(algorithm: string): Hasher | undefined {
  if (algorithm !== "sha256" && algorithm !== "sha512") return undefined;
  const hash = new (bun().CryptoHasher)(algorithm);
  return {
    update: (data) => void hash.update(data),
    hexDigest: () => hash.digest("hex"),
  };
}

// ---- Spawn ----

/**
 * Keeps the tail of the child's stderr. Bun's own pipe for a child's stderr keeps the program alive
 * while it is being read, and an idle proxy must not; so a worker (which does not) reads our own pipe,
 * and closes it at end of file.
 */
function readStderr(fd: number): StderrTail {
  const tail = new TailBuffer();
  const worker = startWorker();
  const done = new Promise<void>((resolve) => {
    worker.onmessage = ({ data }: MessageEvent<Uint8Array | null>) => {
      if (data) return tail.push(data);
      worker.terminate();
      resolve();
    };
    worker.onerror = () => resolve();
  });
  worker.postMessage({ role: "stderr", fd });
  return { tail, done };
}

/** The fd numbers the child gets: its socket end, then the auth memfd. */
const CHILD_SOCKET_FD = 3;
const CHILD_AUTH_FD = 4;

function launch(lib: Libc, request: SpawnRequest, fds: InheritedFds): ChildProcess {
  const argv = request.argv({
    sockfd: CHILD_SOCKET_FD,
    authfd: fds.auth === undefined ? undefined : CHILD_AUTH_FD,
  });
  const stderrPipe = new Int32Array([-1, -1]);
  try {
    if (!request.debug && lib.pipe2(stderrPipe, O_CLOEXEC) !== 0) {
      throw new SpawnError("pipe2() failed: cannot capture the proxy's stderr", []);
    }
    // Bun.spawn dup2()s the extra stdio entries onto fds 3 and 4 in the child only: ours stay
    // close-on-exec, so no other child ever inherits them. It runs on this (the main) thread, which
    // matters for setpriv --pdeathsig: the signal fires when the spawning thread exits.
    const stdio: (string | number)[] = [
      "ignore",
      "ignore",
      request.debug ? "inherit" : stderrPipe[1],
      fds.socket,
    ];
    if (fds.auth !== undefined) stdio.push(fds.auth);
    let child: BunSubprocess;
    try {
      child = bun().spawn(argv, { stdio, env: { ...bun().env, ...request.env } });
    } catch (err) {
      throw cannotStart(argv, err);
    }
    lib.close(stderrPipe[1]);
    stderrPipe[1] = -1;
    let stderr: StderrTail | undefined;
    try {
      // From here the stderr reader owns the pipe's read end.
      stderr = request.debug ? undefined : readStderr(stderrPipe[0]);
      stderrPipe[0] = -1;
    } catch (err) {
      child.kill("SIGKILL");
      throw err;
    }
    return {
      pid: child.pid,
      status: child.exited.then(() => {
        const signal = child.signalCode ?? null;
        return { code: signal ? null : child.exitCode, signal };
      }),
      stderr,
      kill: (signal) => child.kill(signal),
      ref: () => child.ref(),
      unref: () => child.unref(),
    };
  } finally {
    for (const fd of stderrPipe) if (fd >= 0) lib.close(fd);
  }
}

// ---- Factory ----

let runtime: PosixRuntime | undefined;

function bindRuntime(): PosixRuntime {
  if (runtime) return runtime;
  const lib = loadFfi().dlopen("libc.so.6", SYMBOLS).symbols as unknown as Libc;
  const sys = bindSyscalls(lib);
  const now = bindNow(lib);
  runtime = {
    syscalls: sys,
    receiver: (socket) => new BunReceiver(lib, socket),
    openStream: (fd, options) => openStream(sys, fd, options),
    fileSink: (pipe, file) => pollFileSink(now, sys, pipe, file),
    createHasher,
    launch: (request, fds) => launch(lib, request, fds),
  };
  return runtime;
}

/**
 * The Bun transport factory; {@linkcode ImageProxy.spawn} picks it automatically under Bun.
 *
 * @example Passing it explicitly
 * ```ts ignore
 * import { ImageProxy } from "../../mod.ts";
 * import { bunTransport } from "./bun.ts";
 * await using proxy = await ImageProxy.spawn({ transport: bunTransport });
 * console.log(proxy.protocolVersion);
 * ```
 */
export const bunTransport: TransportFactory = posixTransportFactory(bindRuntime, (name) => bun().env[name]);

// ---- Extraction ----

const EXTRACT_SYMBOLS = {
  utimensat: { args: ["i32", "ptr", "ptr", "i32"], returns: "i32" },
  lsetxattr: { args: ["ptr", "ptr", "ptr", "usize", "i32"], returns: "i32" },
  __errno_location: { args: [], returns: "ptr" },
  strerror: { args: ["i32"], returns: "ptr" },
} as const;

interface ExtractLibc {
  utimensat(dirfd: number, path: Uint8Array, times: Uint8Array, flags: number): number;
  lsetxattr(path: Uint8Array, name: Uint8Array, value: Uint8Array, size: number, flags: number): number;
  __errno_location(): number;
  strerror(errno: number): number;
}

/**
 * The extraction's calls with nanosecond times and extended attributes.
 *
 * @returns the calls, bound to libc.
 */
export function extractCalls(): ExtractCalls | undefined {
  const ffi = loadFfi();
  const lib = ffi.dlopen("libc.so.6", EXTRACT_SYMBOLS).symbols as unknown as ExtractLibc;
  return extractCallsOver({
    utimensat: lib.utimensat,
    lsetxattr: lib.lsetxattr,
    errno: () => ffi.read.i32(lib.__errno_location(), 0),
    strerror: (errno) => {
      const text = lib.strerror(errno);
      return text ? new ffi.CString(text).toString() : `errno ${errno}`;
    },
  });
}
