/**
 * The POSIX half of every runtime adapter: the socketpair, the auth memfd, the request/reply steps on
 * SCM_RIGHTS, the reply check, the child's exit and its end. It runs on a small set of synchronous
 * libc calls ({@linkcode Syscalls}) that each adapter binds with its own FFI, and asks the adapter
 * ({@linkcode PosixRuntime}) only for what differs between runtimes: how to start the child, how to
 * wait for a reply without holding the event loop ({@linkcode Receiver}), and how to read pipes.
 *
 * Every adapter is one {@linkcode PosixRuntime}, its members in this order: `syscalls`, `receiver`,
 * `openStream`, `fileSink`, `createHasher`, `launch`, and its file keeps them in that order under the
 * same section markers. What two runtimes do alike lives beside this file: `pool.ts` for FFIs that
 * can wait on a thread pool (Deno; koffi's asynchronous calls under Node, for replies), `poll.ts` for
 * file sinks that never wait inside a call (Bun, whose FFI calls only on the JS thread; Node, whose
 * pool is too small to hold a thread per pipe), `socket-stream.ts` for pipes read by `node:net`
 * (Deno; Node).
 * This module imports no runtime module and reads no runtime global.
 *
 * @module
 */

import { endChild, promiseOf, spinFor, within } from "../async.ts";
import { concat } from "../bytes.ts";
import { type ExitStatus, ProtocolError, SpawnError } from "../errors.ts";
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
import {
  AF_UNIX,
  cmsgSpaceForFds,
  F_GETPIPE_SZ,
  F_SETPIPE_SZ,
  FIONREAD,
  IOVEC_SIZE,
  MFD_CLOEXEC,
  MSG_CTRUNC,
  MSG_NOSIGNAL,
  MSG_TRUNC,
  MSGHDR_SIZE,
  O_CLOEXEC,
  O_WRITE_NEW,
  packMsghdr,
  parseScmRights,
  readMsghdr,
  SHUT_RDWR,
  SOCK_CLOEXEC,
  SOCK_SEQPACKET,
} from "./libc.ts";

/**
 * The libc calls the shared layer makes, bound by each adapter's FFI. They run on the calling thread
 * and return at once, so `errno()` read right after a failed one means something. Lengths are the
 * buffers' own; results are plain numbers (-1 on failure).
 */
export interface Syscalls {
  /** `socketpair(2)`; writes the two fds into `fds`. */
  socketpair(domain: number, type: number, protocol: number, fds: Int32Array): number;
  /** `send(2)` of all of `data`. */
  send(fd: number, data: Uint8Array, flags: number): number;
  /** `write(2)` of all of `data`. */
  write(fd: number, data: Uint8Array): number;
  /** `close(2)`. */
  close(fd: number): number;
  /** `shutdown(2)`. */
  shutdown(fd: number, how: number): number;
  /** `fcntl(2)` with an integer argument. */
  fcntl(fd: number, command: number, argument: number): number;
  /** `ioctl(2)` whose argument is one `int` written back. */
  ioctl(fd: number, request: number, argument: Int32Array): number;
  /** `memfd_create(2)`; `name` ends with a NUL byte. */
  memfd_create(name: Uint8Array, flags: number): number;
  /** `open(2)`; `path` ends with a NUL byte. */
  open(path: Uint8Array, flags: number, mode: number): number;
  /** `sched_yield(2)`. */
  sched_yield(): number;
  /** The calling thread's `errno`. */
  errno(): number;
  /** `strerror(3)`, as text. */
  strerror(errno: number): string;
}

/** Room for more fds than any reply carries, so that extra ones are seen (and closed), not lost. */
const MAX_FDS = 16;
/** Replies larger than this are a protocol error; GetLayerInfo on 400 layers is about 60 KB. */
const REPLY_BUFFER_SIZE = 1 << 20;
/**
 * How long a request waits for its reply on the JS thread before the adapter's own wait takes over.
 * skopeo answers most requests within tens of microseconds, and a thread hop costs about as much
 * again; the bound keeps the event loop from being held for long by a slow request.
 */
const RECEIVE_SPIN_MS = 0.25;

/** Where `recvmsg` writes a reply: one `msghdr` and the buffers it points to, packed once. */
export interface ReceiveBuffers {
  /** All of it; its first 64 bytes are free for a receiver's own state words. */
  memory: ArrayBuffer | SharedArrayBuffer;
  /** The `msghdr` as the shared layer reads it. */
  msghdr: DataView;
  /** The same `msghdr` as bytes, to pass to `recvmsg`. */
  msghdrBytes: Uint8Array;
  /** The control buffer (SCM_RIGHTS). */
  control: Uint8Array;
  /** The data buffer, room for the largest reply accepted (1 MiB). */
  data: Uint8Array;
}

/** Offsets in the receive memory: 64 bytes free for a receiver's own state words, then the rest. */
const MSGHDR_OFFSET = 64;
const IOVEC_OFFSET = 128;
const CONTROL_OFFSET = 192;
const DATA_OFFSET = 512;

/**
 * Allocates the receive buffers and packs the `msghdr` that points into them. The memory must stay
 * referenced, and unmoved, while `recvmsg` may use it: both hold for buffers a receiver keeps.
 *
 * @param shared Whether another thread calls `recvmsg` (a `SharedArrayBuffer` then).
 * @param addressOf The adapter's FFI pointer of a view (its first byte, `byteOffset` included).
 * @returns The buffers, with the `msghdr` ready for the first `recvmsg`.
 */
export function packReceiveBuffers(shared: boolean, addressOf: (view: Uint8Array) => bigint): ReceiveBuffers {
  const size = DATA_OFFSET + REPLY_BUFFER_SIZE;
  const memory = shared ? new SharedArrayBuffer(size) : new ArrayBuffer(size);
  const control = new Uint8Array(memory, CONTROL_OFFSET, cmsgSpaceForFds(MAX_FDS));
  const data = new Uint8Array(memory, DATA_OFFSET, REPLY_BUFFER_SIZE);
  const msghdr = new DataView(memory, MSGHDR_OFFSET, MSGHDR_SIZE);
  packMsghdr(
    msghdr,
    new DataView(memory, IOVEC_OFFSET, IOVEC_SIZE),
    addressOf(new Uint8Array(memory, IOVEC_OFFSET, IOVEC_SIZE)),
    { address: addressOf(data), length: data.length },
    { address: addressOf(control), length: control.length },
  );
  return { memory, msghdr, msghdrBytes: new Uint8Array(memory, MSGHDR_OFFSET, MSGHDR_SIZE), control, data };
}

/**
 * An adapter's way of receiving replies on the socket. Every `recvmsg` passes `MSG_CMSG_CLOEXEC`, so
 * received fds never leak into another child.
 */
export interface Receiver {
  /** Where replies land. */
  readonly buffers: ReceiveBuffers;
  /**
   * One look without waiting, on the JS thread: the byte count of a reply now in the buffers (0 at
   * end of file), or `undefined` while none has come. Throws when receiving failed.
   */
  receiveNow(): number | undefined;
  /** Waits for the reply without holding the event loop; resolves as `receiveNow` does. */
  receiveLater(): Promise<number>;
  /** Hands the buffers back once the reply is copied out of them (resetting what `recvmsg` wrote). */
  release(): void;
  /**
   * Closes the socket (already shut down) once no thread may still use its fd number; a reply that
   * arrives meanwhile is dropped, its fds closed, or left to the request waiting for it.
   */
  stop(): Promise<void>;
}

/** The tail of a child's stderr and when reading it ended. */
export interface StderrTail {
  /** The kept bytes. */
  tail: TailBuffer;
  /** Settles at the pipe's end of file. */
  done: Promise<void>;
}

/**
 * Keeps the tail of a child's stderr as it is read.
 *
 * @param chunks The runtime's stream of the stderr pipe (a Web or a Node stream).
 * @returns The tail, and a promise that settles at end of file (or when reading fails).
 */
export function readStderr(chunks: AsyncIterable<Uint8Array>): StderrTail {
  const tail = new TailBuffer();
  const done = (async () => {
    try {
      for await (const chunk of chunks) tail.push(chunk);
    } catch { /* the child is gone */ }
  })();
  return { tail, done };
}

/** A child as an adapter started it. */
export interface ChildProcess {
  /** Its process id. */
  readonly pid: number;
  /** Settles with how it ended. */
  readonly status: Promise<ExitStatus>;
  /** Its stderr, unless passed through (`debug`). */
  readonly stderr?: StderrTail;
  /** Sends a signal; may throw when the child is gone. */
  kill(signal: "SIGTERM" | "SIGKILL"): void;
  /** Lets the child keep the program alive. */
  ref(): void;
  /** Lets the program exit while the child runs. */
  unref(): void;
}

/** The fds a child inherits, as numbers in the parent: the socket end, and the auth memfd if any. */
export interface InheritedFds {
  /** The child's end of the socketpair. */
  socket: number;
  /** The memfd holding auth data. */
  auth?: number;
}

/** What one runtime adapter provides; the rest of a {@linkcode Transport} is shared. */
export interface PosixRuntime {
  /** The bound libc calls. */
  syscalls: Syscalls;
  /** Starts receiving on our end of the socketpair. */
  receiver(socket: number): Receiver;
  /** Turns a received pipe into a stream (see {@linkcode Transport.openStream}). */
  openStream(fd: number, options: FdStreamOptions): ReadableStream<Uint8Array>;
  /** Moves the bytes of `pipe` into the opened `file`; both fds are the sink's from now on. */
  fileSink(pipe: number, file: number): FileSink;
  /** A fast native hash, if the runtime has one. */
  createHasher(algorithm: string): Hasher | undefined;
  /**
   * Starts the child with `fds` inherited and `request.argv` as its command line. Throws a
   * `SpawnError` (see `cannotStart`) when it cannot start; the fds stay the caller's.
   */
  launch(request: SpawnRequest, fds: InheritedFds): ChildProcess;
}

/**
 * Checks what one `recvmsg` on the proxy socket returned. Throws at end of file, and a
 * `ProtocolError` for a reply or fd list cut short, closing the fds that did come.
 */
function checkReply(n: number, fds: number[], flags: number, closeFd: (fd: number) => void): void {
  if (n === 0 && fds.length === 0) throw new Error("The image proxy closed the connection");
  if (flags & (MSG_TRUNC | MSG_CTRUNC)) {
    for (const fd of fds) closeFd(fd);
    throw new ProtocolError(
      flags & MSG_TRUNC
        ? `Reply larger than ${REPLY_BUFFER_SIZE} bytes`
        : "Reply carried more file descriptors than expected",
    );
  }
}

/**
 * Closes every fd of a reply and throws a `ProtocolError` when one of them is not a pipe. The image
 * proxy sends pipes only, and the readers rely on it: in a pipe's place a regular file would be read
 * as blob bytes, /dev/zero read forever, and a directory or socket refused by a runtime's reader with
 * an untyped error, its fd left open. `F_GETPIPE_SZ` succeeds on pipes (and FIFOs) alone: one `fcntl`
 * per received fd, which every adapter binds already.
 */
function refuseNonPipes(sys: Syscalls, fds: number[]): void {
  const index = fds.findIndex((fd) => sys.fcntl(fd, F_GETPIPE_SZ, 0) <= 0);
  if (index < 0) return;
  for (const fd of fds) sys.close(fd);
  const which = `${index + 1} of ${fds.length}`;
  throw new ProtocolError(
    `Reply carried a file descriptor that is not a pipe (fd ${which}): expected pipes only`,
  );
}

/** A {@linkcode Transport} over a runtime's {@linkcode PosixRuntime}. */
class PosixTransport implements Transport {
  readonly exited: Promise<ChildExit>;
  readonly pid: number;
  readonly #runtime: PosixRuntime;
  readonly #sys: Syscalls;
  readonly #child: ChildProcess;
  readonly #receiver: Receiver;
  #socket: number;
  #receiving = false;
  #killed = false;

  constructor(runtime: PosixRuntime, child: ChildProcess, socket: number) {
    this.#runtime = runtime;
    this.#sys = runtime.syscalls;
    this.#child = child;
    this.#socket = socket;
    this.pid = child.pid;
    this.#receiver = runtime.receiver(socket);
    const stderr = child.stderr;
    this.exited = child.status.then(async (status) => {
      // stderr may be held open by a grandchild; do not wait for it long.
      if (stderr) await within(stderr.done, 200);
      return { ...status, stderrTail: stderr?.tail.text() ?? "", killed: this.#killed };
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
    // skopeo usually answers within tens of microseconds: look for the reply here first. Between
    // looks, give the CPU to skopeo's thread (or the adapter's), which may be waiting for it.
    return spinFor(RECEIVE_SPIN_MS, this.#receiveNow, this.#sys.sched_yield) ?? this.#receiveLater();
  }

  send(packet: Uint8Array): Promise<void> {
    return promiseOf(() => this.#sendNow(packet));
  }

  #sendNow(packet: Uint8Array): void {
    if (this.#socket < 0) throw new Error("The socket is closed");
    if (this.#sys.send(this.#socket, packet, MSG_NOSIGNAL) !== packet.length) {
      throw new Error("Sending to the image proxy failed");
    }
  }

  readonly #receiveNow = (): ReceivedPacket | undefined => {
    const n = this.#receiver.receiveNow();
    return n === undefined ? undefined : this.#packet(n);
  };

  async #receiveLater(): Promise<ReceivedPacket> {
    this.#receiving = true;
    try {
      return this.#packet(await this.#receiver.receiveLater());
    } finally {
      this.#receiving = false;
    }
  }

  /** The reply of `n` bytes now in the buffers, with its fds; checked for truncation. */
  #packet(n: number): ReceivedPacket {
    const { msghdr, control, data } = this.#receiver.buffers;
    const header = readMsghdr(msghdr);
    const fds = parseScmRights(control, header.controlLength);
    const packet = { data: data.slice(0, n), fds };
    this.#receiver.release();
    checkReply(n, fds, header.flags, (fd) => this.closeFd(fd));
    refuseNonPipes(this.#sys, fds);
    return packet;
  }

  openStream(fd: number, options: FdStreamOptions = {}): ReadableStream<Uint8Array> {
    return this.#runtime.openStream(fd, options);
  }

  openFileSink(fd: number, path: string, options: FdStreamOptions = {}): FileSink {
    const file = this.#sys.open(new TextEncoder().encode(`${path}\0`), O_WRITE_NEW | O_CLOEXEC, 0o644);
    if (file < 0) {
      throw new Error(`Cannot open "${path}" for writing: ${this.#sys.strerror(this.#sys.errno())}`);
    }
    if (options.pipeSize) this.#sys.fcntl(fd, F_SETPIPE_SZ, options.pipeSize);
    return this.#runtime.fileSink(fd, file);
  }

  closeFd(fd: number): void {
    this.#sys.close(fd);
  }

  pipeFill(fd: number): { queued: number; capacity: number } | undefined {
    const queued = new Int32Array(1);
    if (this.#sys.ioctl(fd, FIONREAD, queued) !== 0) return undefined;
    const capacity = this.#sys.fcntl(fd, F_GETPIPE_SZ, 0);
    return capacity > 0 ? { queued: queued[0], capacity } : undefined;
  }

  createHasher(algorithm: string): Hasher | undefined {
    return this.#runtime.createHasher(algorithm);
  }

  async close(graceMs = 2000): Promise<ChildExit> {
    // Someone now waits for the exit: let the child keep the program alive until it has happened.
    this.#child.ref();
    if (this.#socket >= 0) {
      // shutdown() wakes a recvmsg waiting on another thread and shows skopeo end of file at once.
      this.#sys.shutdown(this.#socket, SHUT_RDWR);
      this.#socket = -1;
      await this.#receiver.stop();
    }
    const { exit, killed } = await endChild(this.exited, (signal) => {
      this.#killed = true;
      this.#kill(signal);
    }, graceMs);
    return killed ? { ...exit, killed } : exit;
  }

  #kill(signal: "SIGTERM" | "SIGKILL"): void {
    try {
      this.#child.kill(signal);
    } catch { /* already gone */ }
  }
}

/**
 * Creates a memfd holding `bytes` for the child to read as its auth file. It is close-on-exec: the
 * adapter's launch hands it to the one child that must inherit it.
 */
function authMemfd(sys: Syscalls, bytes: Uint8Array): number {
  const fd = sys.memfd_create(new TextEncoder().encode("containers-auth.json\0"), MFD_CLOEXEC);
  if (fd < 0) throw new SpawnError("memfd_create failed: cannot pass the auth data", []);
  for (let offset = 0; offset < bytes.length;) {
    const n = sys.write(fd, bytes.subarray(offset));
    if (n <= 0) {
      sys.close(fd);
      throw new SpawnError("Writing the auth data to its memfd failed", []);
    }
    offset += n;
  }
  return fd;
}

/** Creates the socketpair (and the auth memfd), starts the child and connects to it. */
function spawnProxy(runtime: PosixRuntime, request: SpawnRequest): Transport {
  const sys = runtime.syscalls;
  const pair = new Int32Array(2);
  if (sys.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) !== 0) {
    throw new SpawnError("socketpair(AF_UNIX, SOCK_SEQPACKET) failed", []);
  }
  const [ours, theirs] = pair;
  let auth: number | undefined;
  try {
    if (request.authData) auth = authMemfd(sys, request.authData);
    const child = runtime.launch(request, { socket: theirs, auth });
    try {
      return new PosixTransport(runtime, child, ours);
    } catch (err) {
      child.kill("SIGKILL");
      throw err;
    }
  } catch (err) {
    sys.close(ours);
    throw err;
  } finally {
    // The child has its copies now (or never will): ours would only keep its socket open.
    sys.close(theirs);
    if (auth !== undefined) sys.close(auth);
  }
}

/**
 * The {@linkcode TransportFactory} of one runtime adapter.
 *
 * @param bind Binds the adapter on its first spawn (opening libc), then returns the same one.
 * @param env Reads an environment variable, as the runtime allows.
 * @returns The factory the adapter exports.
 */
export function posixTransportFactory(
  bind: () => PosixRuntime,
  env: (name: string) => string | undefined,
): TransportFactory {
  return { spawn: (request) => promiseOf(() => spawnProxy(bind(), request)), env };
}

/** Keeps the last `limit` bytes of a byte stream as text: the tail of a child's stderr. */
export class TailBuffer {
  #chunks: Uint8Array[] = [];
  #length = 0;
  readonly #limit: number;
  /** Creates a buffer that keeps the last `limit` bytes. */
  constructor(limit = 8192) {
    this.#limit = limit;
  }
  /** Appends bytes, dropping the oldest beyond the limit. */
  push(chunk: Uint8Array): void {
    this.#chunks.push(chunk);
    this.#length += chunk.length;
    while (this.#chunks.length > 1 && this.#length - this.#chunks[0].length >= this.#limit) {
      this.#length -= this.#chunks.shift()!.length;
    }
  }
  /** The kept bytes as text, cut at the first line start inside the limit. */
  text(): string {
    const all = concat(this.#chunks);
    let tail = all.subarray(Math.max(0, all.length - this.#limit));
    if (tail.length < all.length) {
      const newline = tail.indexOf(10);
      if (newline >= 0) tail = tail.subarray(newline + 1);
    }
    return new TextDecoder().decode(tail);
  }
}
