/**
 * The Bun adapter: libc through `bun:ffi` for the socketpair and SCM_RIGHTS, `Bun.spawn` for the child,
 * and Bun's own pipe reader for received pipes.
 *
 * `bun:ffi` calls are synchronous, so the one call that blocks, `recvmsg`, runs on a small worker thread
 * that owns nothing but that call: the main thread packs the `msghdr` into a `SharedArrayBuffer`, the
 * worker sits in `recvmsg` on it, and hands each packet over with `Atomics.notify`, which resolves the
 * main thread's `Atomics.waitAsync`; a reply that comes within a quarter of a millisecond is seen sooner,
 * by the main thread watching the shared state word right after the send. Pipes need no thread at all: `Bun.file(fd).stream()` reads them
 * from Bun's event loop when they are readable, with backpressure, and a blob saved to a file is moved
 * with `splice(SPLICE_F_NONBLOCK)`, retried on a short timer while its pipe is empty.
 *
 * @module
 */

import { endChild, promiseOf, spinFor, within } from "../async.ts";
import { cannotStart, SpawnError } from "../errors.ts";
import { fsync } from "node:fs";
import type {
  ChildExit,
  FdStreamOptions,
  FileSink,
  Hasher,
  ReceivedPacket,
  SpawnRequest,
  Transport,
  TransportFactory,
} from "../transport.ts";
import type { BunFfi, BunGlobal, BunSubprocess, BunWorker } from "./bun-api.ts";
import {
  AF_UNIX,
  checkReply,
  cmsgSpaceForFds,
  EAGAIN,
  EINTR,
  EINVAL,
  F_GETFL,
  F_GETPIPE_SZ,
  F_SETFL,
  F_SETPIPE_SZ,
  FIONREAD,
  IOVEC_SIZE,
  MFD_CLOEXEC,
  MSG_CMSG_CLOEXEC,
  MSG_NOSIGNAL,
  MSGHDR_SIZE,
  O_CLOEXEC,
  O_NONBLOCK,
  O_WRITE_NEW,
  packMsghdr,
  parseScmRights,
  readMsghdr,
  REPLY_BUFFER_SIZE,
  resetMsghdr,
  SHUT_RDWR,
  SOCK_CLOEXEC,
  SOCK_SEQPACKET,
  SPLICE_F_MOVE,
  SPLICE_F_NONBLOCK,
  TailBuffer,
} from "./libc.ts";

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
let libc: Libc | undefined;

/**
 * `bun:ffi`, loaded with Bun's synchronous `import.meta.require`: a static import would put the `bun:`
 * scheme into Deno's module graph, which type-checks this file.
 */
function loadFfi(): BunFfi {
  ffi ??= (import.meta as unknown as { require(id: string): BunFfi }).require("bun:ffi");
  return ffi;
}

function loadLibc(): Libc {
  libc ??= loadFfi().dlopen("libc.so.6", SYMBOLS).symbols as unknown as Libc;
  return libc;
}

/** The main thread's errno; read it right after the failed call. */
function errnoOf(lib: Libc): number {
  return loadFfi().read.i32(lib.__errno_location(), 0);
}

function errorText(lib: Libc, errno: number): string {
  const text = lib.strerror(errno);
  return text ? new (loadFfi().CString)(text).toString() : `errno ${errno}`;
}

/** Waits for a pipe that had nothing: short at first, longer while it stays empty. */
const SINK_POLL_MS = [1, 1, 2, 4, 8, 16];

function bun(): BunGlobal {
  return (globalThis as unknown as { Bun: BunGlobal }).Bun;
}

/** Room for more fds than any reply carries, so that extra ones are seen (and closed), not lost. */
const MAX_FDS = 16;
/**
 * How long a request watches for its reply on the JS thread before waiting for the receiver's
 * notification, which takes tens of microseconds to reach the event loop; the bound keeps the event
 * loop from being held for long by a slow request.
 */
const RECEIVE_SPIN_MS = 0.25;

/** The receiver's state word: the worker may call `recvmsg` (the buffers are its). */
const ARMED = 0;
/** The receiver's state word: a result waits in the buffers (they are the main thread's). */
const READY = 1;
/** The receiver's state word: the worker must return. */
const STOP = 2;

/** Offsets in the shared buffer: state words, then `msghdr`, `iovec`, control and data buffers. */
const STATE_OFFSET = 0;
const MSGHDR_OFFSET = 64;
const IOVEC_OFFSET = 128;
const CONTROL_OFFSET = 192;
const DATA_OFFSET = 512;

/**
 * The worker threads' code, for two roles. As the receiver it knows no layouts: it calls `recvmsg` on a
 * `msghdr` the main thread packed, stores the result and errno (read on the thread that made the call,
 * so it means something), and waits until the main thread has taken the packet and re-armed it. As the
 * stderr reader it owns the read end of the child's stderr pipe: it posts what it reads and closes the
 * fd at end of file. Only `EINTR` is retried.
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
  const state = new Int32Array(shared, ${STATE_OFFSET}, 4);
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

class BunTransport implements Transport {
  readonly exited: Promise<ChildExit>;
  readonly pid: number;
  readonly #lib: Libc;
  readonly #child: BunSubprocess;
  #socket: number;
  readonly #receiver: BunWorker;
  /** How many operations need the receiver now; the worker keeps the program alive only while > 0. */
  #holds = 0;
  readonly #state: Int32Array;
  readonly #msghdr: DataView;
  readonly #control: Uint8Array;
  readonly #data: Uint8Array;
  #receiving = false;
  #stopped: Promise<void> | undefined;
  #killed = false;

  constructor(lib: Libc, child: BunSubprocess, socket: number, stderr: StderrReader | undefined) {
    this.#lib = lib;
    this.#child = child;
    this.#socket = socket;
    this.pid = child.pid;
    const { ptr } = loadFfi();
    // One shared buffer for everything recvmsg touches: its memory never moves and both threads see it.
    const shared = new SharedArrayBuffer(DATA_OFFSET + REPLY_BUFFER_SIZE);
    this.#state = new Int32Array(shared, STATE_OFFSET, 4);
    this.#msghdr = new DataView(shared, MSGHDR_OFFSET, MSGHDR_SIZE);
    this.#control = new Uint8Array(shared, CONTROL_OFFSET, cmsgSpaceForFds(MAX_FDS));
    this.#data = new Uint8Array(shared, DATA_OFFSET, REPLY_BUFFER_SIZE);
    const iovec = new Uint8Array(shared, IOVEC_OFFSET, IOVEC_SIZE);
    packMsghdr(
      this.#msghdr,
      new DataView(shared, IOVEC_OFFSET, IOVEC_SIZE),
      BigInt(ptr(iovec)),
      { address: BigInt(ptr(this.#data)), length: this.#data.length },
      { address: BigInt(ptr(this.#control)), length: this.#control.length },
    );
    this.#receiver = startWorker();
    this.#receiver.onerror = () => {
      // A receiver that failed to start (or died) must not leave a request waiting forever.
      this.#state[1] = -1;
      this.#state[2] = 0;
      Atomics.compareExchange(this.#state, 0, ARMED, READY);
      Atomics.notify(this.#state, 0);
    };
    this.#receiver.postMessage({
      socket,
      msghdr: ptr(new Uint8Array(shared, MSGHDR_OFFSET, MSGHDR_SIZE)),
      flags: MSG_CMSG_CLOEXEC,
      shared,
    });
    const stderrDone = stderr?.done ?? Promise.resolve();
    this.exited = child.exited.then(async () => {
      // stderr may be held open by a grandchild; do not wait for it long.
      await within(stderrDone, 200);
      const signal = child.signalCode ?? null;
      return {
        code: signal ? null : child.exitCode,
        signal,
        stderrTail: stderr?.tail.text() ?? "",
        killed: this.#killed,
      };
    });
    // An idle proxy must not keep the program alive: skopeo exits when our end of the socket closes.
    child.unref();
  }

  request(packet: Uint8Array): Promise<ReceivedPacket> {
    return promiseOf(() => this.requestNow(packet));
  }

  requestNow(packet: Uint8Array): ReceivedPacket | Promise<ReceivedPacket> {
    if (this.#receiving) throw new Error("Concurrent receive on the proxy socket");
    this.#sendNow(packet);
    // skopeo usually answers within tens of microseconds: watch the receiver's state word here rather
    // than wait for its notification to reach the event loop. Between looks, give the CPU to the
    // receiver or skopeo's thread, which may be waiting for it.
    return spinFor(
      RECEIVE_SPIN_MS,
      () => Atomics.load(this.#state, 0) === READY ? this.#result() : undefined,
      this.#lib.sched_yield,
    ) ?? this.#receive();
  }

  send(packet: Uint8Array): Promise<void> {
    return promiseOf(() => this.#sendNow(packet));
  }

  #sendNow(packet: Uint8Array): void {
    if (this.#socket < 0) throw new Error("The socket is closed");
    const sent = Number(this.#lib.send(this.#socket, packet, packet.length, MSG_NOSIGNAL));
    if (sent !== packet.length) throw new Error("Sending to the image proxy failed");
  }

  #hold(delta: 1 | -1): void {
    this.#holds += delta;
    if (delta > 0 && this.#holds === 1) this.#receiver.ref();
    if (delta < 0 && this.#holds === 0) this.#receiver.unref();
  }

  /** Resolves once the receiver has a result in the buffers (or was stopped). */
  async #ready(): Promise<void> {
    const state = this.#state;
    while (Atomics.load(state, 0) === ARMED) {
      const wait = Atomics.waitAsync(state, 0, ARMED);
      if (wait.async) await wait.value;
    }
  }

  async #receive(): Promise<ReceivedPacket> {
    if (this.#receiving) throw new Error("Concurrent receive on the proxy socket");
    this.#receiving = true;
    this.#hold(1);
    try {
      await this.#ready();
      return this.#result();
    } finally {
      this.#hold(-1);
      this.#receiving = false;
    }
  }

  /** The reply the receiver has ready, validated; the buffers go back to the receiver. */
  #result(): ReceivedPacket {
    // close() takes over a result that arrives after it started (and closes its fds).
    if (this.#socket < 0 || Atomics.load(this.#state, 0) !== READY) throw new Error("The socket is closed");
    const result = this.#take();
    if (result.n < 0) throw new Error(`Receiving from the image proxy failed (errno ${result.errno})`);
    checkReply(result.n, result.fds, result.flags, (fd) => this.closeFd(fd));
    return { data: result.data, fds: result.fds };
  }

  /** Copies the received packet out of the shared buffers and hands them back to the receiver. */
  #take(): { n: number; errno: number; flags: number; data: Uint8Array; fds: number[] } {
    const n = this.#state[1];
    const errno = this.#state[2];
    const header = readMsghdr(this.#msghdr);
    const fds = n >= 0 ? parseScmRights(this.#control, header.controlLength) : [];
    const data = this.#data.slice(0, Math.max(n, 0));
    resetMsghdr(this.#msghdr, this.#control.length);
    Atomics.store(this.#state, 0, ARMED);
    Atomics.notify(this.#state, 0);
    return { n, errno, flags: header.flags, data, fds };
  }

  openStream(fd: number, options: FdStreamOptions = {}): ReadableStream<Uint8Array> {
    const lib = this.#lib;
    if (options.pipeSize) lib.fcntl(fd, F_SETPIPE_SZ, options.pipeSize);
    // Bun's reader reads from its own dup of the fd, from the event loop, when the pipe is readable.
    // Ours is still closed only once that reader has finished or been cancelled, so that no read can
    // ever meet a closed (or reused) fd number.
    let source: ReadableStreamDefaultReader<Uint8Array> | undefined;
    let closed = false;
    const close = async () => {
      if (closed) return;
      closed = true;
      await source?.cancel().catch(() => {});
      lib.close(fd);
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

  /**
   * `bun:ffi` calls run on this thread, so the sink never waits inside one: it splices without
   * waiting for the pipe (`SPLICE_F_NONBLOCK`), and when the pipe is empty it tries again after a
   * short timer (1 ms, backing off to 16 ms while it stays empty). A 1 MiB pipe that skopeo fills at
   * 1 GiB/s takes about 1 ms. The flush runs on Bun's thread pool (`node:fs` fds are real ones there).
   */
  openFileSink(fd: number, path: string, options: FdStreamOptions = {}): FileSink {
    const lib = this.#lib;
    const file = lib.open(new TextEncoder().encode(`${path}\0`), O_WRITE_NEW | O_CLOEXEC, 0o644);
    if (file < 0) throw new Error(`Cannot open "${path}" for writing: ${errorText(lib, errnoOf(lib))}`);
    if (options.pipeSize) lib.fcntl(fd, F_SETPIPE_SZ, options.pipeSize);
    let pipe = fd;
    let target = file;
    let fileClosed: Promise<void> | undefined;
    // Set once splice() proved impossible for this file (a device without splice support, say).
    let copyBuffer: Uint8Array | undefined;
    const closedError = () => new Error("The pipe or the file is closed");
    /** One attempt: bytes moved, 0 at end of file, or -1 when the pipe is empty for now. */
    const tryMove = (max: number): number => {
      if (copyBuffer) {
        const buffer = copyBuffer.subarray(0, Math.min(max, copyBuffer.length));
        const n = Number(lib.read(pipe, buffer, buffer.length));
        if (n < 0) {
          const errno = errnoOf(lib);
          if (errno === EAGAIN || errno === EINTR) return -1;
          throw new Error(`Reading the pipe failed: ${errorText(lib, errno)}`);
        }
        for (let offset = 0; offset < n;) {
          const written = Number(lib.write(target, buffer.subarray(offset, n), n - offset));
          if (written < 0 && errnoOf(lib) === EINTR) continue;
          if (written <= 0) {
            throw new Error(written < 0 ? errorText(lib, errnoOf(lib)) : "The file took no bytes");
          }
          offset += written;
        }
        return n;
      }
      const n = Number(lib.splice(pipe, null, target, null, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK));
      if (n >= 0) return n;
      const errno = errnoOf(lib);
      if (errno === EAGAIN || errno === EINTR) return -1;
      if (errno !== EINVAL) throw new Error(errorText(lib, errno));
      // Copy instead; the read end is ours alone, so making it non-blocking affects no one else.
      lib.fcntl(pipe, F_SETFL, lib.fcntl(pipe, F_GETFL, 0) | O_NONBLOCK);
      copyBuffer = new Uint8Array(1 << 20);
      return tryMove(max);
    };
    return {
      move: async (max) => {
        for (let wait = 0;; wait++) {
          if (pipe < 0 || target < 0) throw closedError();
          const n = tryMove(max);
          if (n >= 0) return n;
          const ms = SINK_POLL_MS[Math.min(wait, SINK_POLL_MS.length - 1)];
          await new Promise((resolve) => setTimeout(resolve, ms));
        }
      },
      closePipe: () => {
        if (pipe >= 0) lib.close(pipe);
        pipe = -1;
      },
      closeFile: (flush) => {
        fileClosed ??= (async () => {
          const fileFd = target;
          target = -1;
          if (fileFd < 0) return;
          try {
            if (flush) {
              await new Promise<void>((resolve, reject) =>
                fsync(fileFd, (err) => {
                  // A device such as /dev/null cannot be flushed at all; that is no failure.
                  const code = (err as { code?: string } | null)?.code;
                  if (err && code !== "EINVAL" && code !== "EROFS") reject(err);
                  else resolve();
                })
              );
            }
          } finally {
            lib.close(fileFd);
          }
        })();
        return fileClosed;
      },
    };
  }

  closeFd(fd: number): void {
    this.#lib.close(fd);
  }

  pipeFill(fd: number): { queued: number; capacity: number } | undefined {
    const queued = new Int32Array(1);
    if (this.#lib.ioctl(fd, FIONREAD, queued) !== 0) return undefined;
    const capacity = this.#lib.fcntl(fd, F_GETPIPE_SZ, 0);
    return capacity > 0 ? { queued: queued[0], capacity } : undefined;
  }

  createHasher(algorithm: string): Hasher | undefined {
    if (algorithm !== "sha256" && algorithm !== "sha512") return undefined;
    const hash = new (bun().CryptoHasher)(algorithm);
    return {
      update: (data) => void hash.update(data),
      hexDigest: () => hash.digest("hex"),
    };
  }

  /**
   * Stops the receiver once it is out of `recvmsg`, then closes the socket: never while the worker may
   * still use the fd number. A result that arrived meanwhile is dropped, its fds closed.
   */
  #stopReceiver(socket: number): Promise<void> {
    this.#stopped ??= (async () => {
      this.#hold(1);
      try {
        // After shutdown() the pending recvmsg returns at once; a receive in progress re-arms it.
        while (Atomics.load(this.#state, 0) !== STOP) {
          await this.#ready();
          if (Atomics.load(this.#state, 0) !== READY) continue;
          if (this.#state[1] >= 0) {
            const header = readMsghdr(this.#msghdr);
            for (const fd of parseScmRights(this.#control, header.controlLength)) this.#lib.close(fd);
          }
          Atomics.store(this.#state, 0, STOP);
          Atomics.notify(this.#state, 0);
        }
        this.#lib.close(socket);
        this.#receiver.terminate();
      } finally {
        this.#hold(-1);
      }
    })();
    return this.#stopped;
  }

  async close(graceMs = 2000): Promise<ChildExit> {
    if (this.#socket >= 0) {
      const socket = this.#socket;
      this.#socket = -1;
      // shutdown() wakes the worker's recvmsg and shows skopeo end of file at once.
      this.#lib.shutdown(socket, SHUT_RDWR);
      await this.#stopReceiver(socket);
    }
    const { exit, killed } = await endChild(this.exited, (signal) => {
      this.#killed = true;
      this.#kill(signal);
    }, graceMs);
    return killed ? { ...exit, killed } : exit;
  }

  #kill(signal: string): void {
    try {
      this.#child.kill(signal);
    } catch { /* already gone */ }
  }
}

/**
 * Keeps the tail of the child's stderr. Bun's own pipe for a child's stderr keeps the program alive
 * while it is being read, and an idle proxy must not; so a worker (which does not) reads our own pipe.
 */
interface StderrReader {
  tail: TailBuffer;
  /** Settles at end of file, once the worker has closed the pipe. */
  done: Promise<void>;
}

function readStderr(fd: number): StderrReader {
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

function spawnSync(request: SpawnRequest): Transport {
  const lib = loadLibc();
  const pair = new Int32Array(2);
  if (lib.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) !== 0) {
    throw new SpawnError("socketpair(AF_UNIX, SOCK_SEQPACKET) failed", []);
  }
  const [ours, theirs] = pair;
  let authfd: number | undefined;
  const stderrPipe = new Int32Array([-1, -1]);
  try {
    if (!request.debug && lib.pipe2(stderrPipe, O_CLOEXEC) !== 0) {
      throw new SpawnError("pipe2() failed: cannot capture the proxy's stderr", []);
    }
    if (request.authData) {
      authfd = lib.memfd_create(new TextEncoder().encode("containers-auth.json\0"), MFD_CLOEXEC);
      if (authfd < 0) throw new SpawnError("memfd_create failed: cannot pass the auth data", []);
      let offset = 0;
      while (offset < request.authData.length) {
        const chunk = request.authData.subarray(offset);
        const n = Number(lib.write(authfd, chunk, chunk.length));
        if (n <= 0) throw new SpawnError("Writing the auth data to its memfd failed", []);
        offset += n;
      }
    }
    const argv = request.argv({
      sockfd: CHILD_SOCKET_FD,
      authfd: authfd === undefined ? undefined : CHILD_AUTH_FD,
    });
    // Bun.spawn dup2()s the extra stdio entries onto fds 3 and 4 in the child only: ours stay
    // close-on-exec, so no other child ever inherits them. It runs on this (the main) thread, which
    // matters for setpriv --pdeathsig: the signal fires when the spawning thread exits.
    const stdio: (string | number)[] = [
      "ignore",
      "ignore",
      request.debug ? "inherit" : stderrPipe[1],
      theirs,
    ];
    if (authfd !== undefined) stdio.push(authfd);
    let child: BunSubprocess;
    try {
      child = bun().spawn(argv, { stdio, env: { ...bun().env, ...request.env } });
    } catch (err) {
      throw cannotStart(argv, err);
    }
    lib.close(stderrPipe[1]);
    stderrPipe[1] = -1;
    try {
      // From here the stderr reader owns the pipe's read end.
      const stderr = request.debug ? undefined : readStderr(stderrPipe[0]);
      stderrPipe[0] = -1;
      return new BunTransport(lib, child, ours, stderr);
    } catch (err) {
      child.kill("SIGKILL");
      throw err;
    }
  } catch (err) {
    lib.close(ours);
    throw err;
  } finally {
    lib.close(theirs);
    if (authfd !== undefined) lib.close(authfd);
    for (const fd of stderrPipe) if (fd >= 0) lib.close(fd);
  }
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
export const bunTransport: TransportFactory = {
  spawn: (request) => {
    try {
      return Promise.resolve(spawnSync(request));
    } catch (err) {
      return Promise.reject(err);
    }
  },
  env: (name) => bun().env[name],
};
