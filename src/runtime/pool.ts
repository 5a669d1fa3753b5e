/**
 * The reply receiver, pipe reads and file sinks for runtimes whose FFI can run a blocking libc call on
 * a thread pool (Deno's `nonblocking` symbols; koffi's asynchronous calls under Node, which uses only
 * the receiver). The call waits on a pool thread and the event loop stays free. errno does not come back from the pool thread, so where the
 * reason matters, a failed call is made once more on the JS thread, without waiting, to learn it.
 *
 * @module
 */

import type { FileSink } from "../transport.ts";
import {
  EAGAIN,
  EINTR,
  EINVAL,
  EROFS,
  MSG_CMSG_CLOEXEC,
  MSG_DONTWAIT,
  resetMsghdr,
  SPLICE_F_MOVE,
  SPLICE_F_NONBLOCK,
} from "./libc.ts";
import { packReceiveBuffers, type ReceiveBuffers, type Receiver, type Syscalls } from "./posix.ts";

/** The two `recvmsg` calls of a {@linkcode PoolReceiver}. */
export interface PoolReceiveCalls {
  /** `recvmsg(2)` into a packed `msghdr`, on a pool thread. */
  recvmsg(fd: number, msghdr: Uint8Array, flags: number): Promise<number>;
  /** `recvmsg(2)` on the JS thread (with `MSG_DONTWAIT`, it never waits). */
  recvmsgNow(fd: number, msghdr: Uint8Array, flags: number): number;
}

/** The libc calls made on the thread pool, and the few made again on the JS thread to learn errno. */
export interface PoolCalls extends PoolReceiveCalls {
  /** `read(2)` into all of `buffer`, on a pool thread. */
  read(fd: number, buffer: Uint8Array): Promise<number>;
  /** `write(2)` of all of `data`, on a pool thread. */
  write(fd: number, data: Uint8Array): Promise<number>;
  /** `splice(2)` between two fds (no offsets), on a pool thread. */
  splice(fdIn: number, fdOut: number, length: number, flags: number): Promise<number>;
  /** `fsync(2)`, on a pool thread. */
  fsync(fd: number): Promise<number>;
  /** `splice(2)` on the JS thread. */
  spliceNow(fdIn: number, fdOut: number, length: number, flags: number): number;
  /** `fsync(2)` on the JS thread. */
  fsyncNow(fd: number): number;
}

/** Read size for small payload pipes. */
export const SMALL_READ = 64 * 1024;
/**
 * The largest read of a blob pipe. Reading a full 1 MiB pipe at once made chunks that V8 collected
 * late. With 192 KiB reads, getRawBlob of 1 GiB on skopeo 1.22 (hashing in this thread) peaked about
 * 20 MiB lower and was no slower: 0.96-1.00 vs 0.93-0.98 GiB/s, peak RSS 101-106 vs 122-125 MiB.
 */
export const BLOB_READ = 192 * 1024;
/**
 * Reads land in the free tail of a slab this big, so no read allocates (and zeroes) a fresh buffer.
 * Larger slabs only kept more memory alive until the next collection.
 */
const SLAB_SIZE = 1 << 20;

/**
 * Receives on the JS thread without waiting (`MSG_DONTWAIT`), and waits with a `recvmsg` on the pool.
 */
export class PoolReceiver implements Receiver {
  readonly buffers: ReceiveBuffers;
  readonly #pool: PoolReceiveCalls;
  readonly #sys: Syscalls;
  readonly #socket: number;
  /** The pool call in flight, if any: the socket is closed only once it has returned. */
  #pending: Promise<unknown> | undefined;
  #stopped = false;

  /**
   * Starts receiving on `socket`.
   *
   * @param pool The adapter's `recvmsg` calls.
   * @param sys The adapter's syscalls.
   * @param socket Our end of the socketpair; the receiver closes it in `stop`.
   * @param addressOf The adapter's FFI pointer of a view (see `packReceiveBuffers`).
   */
  constructor(
    pool: PoolReceiveCalls,
    sys: Syscalls,
    socket: number,
    addressOf: (view: Uint8Array) => bigint,
  ) {
    this.#pool = pool;
    this.#sys = sys;
    this.#socket = socket;
    this.buffers = packReceiveBuffers(false, addressOf);
  }

  receiveNow(): number | undefined {
    resetMsghdr(this.buffers.msghdr, this.buffers.control.length);
    const n = this.#pool.recvmsgNow(this.#socket, this.buffers.msghdrBytes, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    return n < 0 ? undefined : n;
  }

  async receiveLater(): Promise<number> {
    for (let attempt = 0;; attempt++) {
      if (this.#stopped) throw new Error("The socket is closed");
      resetMsghdr(this.buffers.msghdr, this.buffers.control.length);
      const call = this.#pool.recvmsg(this.#socket, this.buffers.msghdrBytes, MSG_CMSG_CLOEXEC);
      this.#pending = call;
      const n = await call.finally(() => this.#pending = undefined);
      if (n >= 0) return n;
      // errno is not readable from here (the call ran on another thread): retry a possible EINTR.
      if (attempt >= 3) throw new Error("Receiving from the image proxy failed");
    }
  }

  release(): void {
    // Each recvmsg resets the header first: nothing to hand back.
  }

  stop(): Promise<void> {
    this.#stopped = true;
    // The pending recvmsg returns 0 after shutdown(), once a pool thread runs it: close then, without
    // holding close() on a pool that other calls may keep busy.
    if (this.#pending) this.#pending.finally(() => this.#sys.close(this.#socket));
    else this.#sys.close(this.#socket);
    return Promise.resolve();
  }
}

/**
 * A pipe read on the thread pool. The fd is closed at end of file, on error and on cancel; a cancel
 * during a read leaves the close to that read, so the fd number is never closed (and reused) under a
 * pending call.
 *
 * @param pool The adapter's pool calls.
 * @param sys The adapter's syscalls (for `close`).
 * @param fd The pipe's read end; the stream owns it.
 * @param readSize The most bytes one read asks for.
 * @returns The pipe's bytes, as they are read.
 */
export function poolStream(
  pool: PoolCalls,
  sys: Syscalls,
  fd: number,
  readSize: number,
): ReadableStream<Uint8Array> {
  let reading = false;
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    sys.close(fd);
  };
  let slab = new Uint8Array(0);
  let used = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      // Chunks handed out are views of the slab; a new slab starts when the tail is too short.
      if (slab.length - used < readSize) {
        slab = new Uint8Array(Math.max(SLAB_SIZE, readSize));
        used = 0;
      }
      const buffer = slab.subarray(used, used + readSize);
      reading = true;
      let n: number;
      try {
        n = await pool.read(fd, buffer);
        if (n < 0 && !closed) n = await pool.read(fd, buffer);
      } finally {
        reading = false;
      }
      if (closed) {
        // Cancelled while the read was pending: the close was left to us.
        sys.close(fd);
        return;
      }
      if (n < 0) {
        close();
        controller.error(new Error(`Reading pipe fd ${fd} failed`));
        return;
      }
      if (n === 0) {
        close();
        controller.close();
        return;
      }
      used += n;
      controller.enqueue(buffer.subarray(0, n));
    },
    cancel() {
      if (reading) closed = true; // the pending read closes it when it returns
      else close();
    },
  }, { highWaterMark: 1 });
}

/**
 * A file sink whose `splice` waits for the pipe on a pool thread. Closing an fd while a call uses it
 * is left to that call, when it returns.
 *
 * @param pool The adapter's pool calls.
 * @param sys The adapter's syscalls.
 * @param fd The pipe's read end; the sink owns it.
 * @param file The opened file; the sink owns it.
 * @returns The sink.
 */
export function poolFileSink(pool: PoolCalls, sys: Syscalls, fd: number, file: number): FileSink {
  let pipe = fd;
  let target = file;
  let pipeWanted = true;
  let fileWanted = true;
  let pending: Promise<unknown> | undefined;
  let fileClosed: Promise<void> | undefined;
  const closePipeNow = () => {
    if (pipe >= 0) sys.close(pipe);
    pipe = -1;
  };
  const closeFileNow = () => {
    if (target >= 0) sys.close(target);
    target = -1;
  };
  // Set once splice() proved impossible for this file (a device without splice support, say).
  let copyBuffer: Uint8Array | undefined;
  const wait = async <T>(call: Promise<T>): Promise<T> => {
    pending = call;
    try {
      return await call;
    } finally {
      pending = undefined;
      if (!pipeWanted) closePipeNow();
      if (!fileWanted) closeFileNow();
    }
  };
  const closedError = () => new Error("The pipe or the file is closed");
  const copy = async (buffer: Uint8Array): Promise<number> => {
    let n = await wait(pool.read(pipe, buffer));
    if (n < 0 && pipe >= 0) n = await wait(pool.read(pipe, buffer));
    if (pipe < 0 || n === 0) return 0;
    if (n < 0) throw new Error("Reading the pipe failed");
    for (let offset = 0; offset < n;) {
      if (target < 0) throw closedError();
      const rest = buffer.subarray(offset, n);
      let written = await wait(pool.write(target, rest));
      // errno stayed on the pool thread: write again here to learn it.
      if (written <= 0 && target >= 0) written = sys.write(target, rest);
      if (written <= 0) {
        throw new Error(written < 0 ? sys.strerror(sys.errno()) : "The file took no bytes");
      }
      offset += written;
    }
    return n;
  };
  return {
    move: async (max) => {
      for (let attempt = 0;; attempt++) {
        if (pipe < 0 || target < 0) throw closedError();
        if (copyBuffer) return await copy(copyBuffer.subarray(0, Math.min(max, copyBuffer.length)));
        // splice() waits for the pipe on a pool thread; the file side never waits long.
        let n = await wait(pool.splice(pipe, target, max, SPLICE_F_MOVE));
        if (n >= 0 || pipe < 0 || target < 0) return Math.max(n, 0);
        // errno stayed on the pool thread: try once more without waiting, here, to learn it.
        n = pool.spliceNow(pipe, target, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n >= 0) return n;
        const errno = sys.errno();
        if (errno === EINVAL) copyBuffer = new Uint8Array(BLOB_READ);
        else if ((errno !== EAGAIN && errno !== EINTR) || attempt >= 3) throw new Error(sys.strerror(errno));
      }
    },
    closePipe: () => {
      pipeWanted = false;
      if (!pending) closePipeNow();
    },
    closeFile: (flush) => {
      fileClosed ??= (async () => {
        if (!flush) {
          // A move waiting on a stalled pipe may never return: leave the close to it.
          fileWanted = false;
          if (!pending) closeFileNow();
          return;
        }
        await pending?.catch(() => {});
        try {
          if (target < 0) throw new Error("The file is closed");
          if (await pool.fsync(target) !== 0) {
            // errno stayed on the pool thread: a second call here tells a target that cannot be
            // flushed at all (a device such as /dev/null: EINVAL) from a real failure.
            const again = pool.fsyncNow(target);
            const errno = again === 0 ? 0 : sys.errno();
            if (errno !== EINVAL && errno !== EROFS) {
              throw new Error(`fsync failed${errno ? `: ${sys.strerror(errno)}` : ""}`);
            }
          }
        } finally {
          closeFileNow();
        }
      })();
      return fileClosed;
    },
  };
}
