/**
 * File sinks that never wait inside an FFI call: for runtimes whose FFI calls run only on the JS
 * thread (`bun:ffi`), and for Node, whose thread pool (four threads by default, shared with `node:fs`)
 * must not be held by a pipe that may stall. The pipe is spliced without waiting and polled on a
 * short timer while it is empty.
 *
 * @module
 */

import { fsync } from "node:fs";
import type { FileSink } from "../transport.ts";
import {
  EAGAIN,
  EINTR,
  EINVAL,
  F_GETFL,
  F_SETFL,
  O_NONBLOCK,
  SPLICE_F_MOVE,
  SPLICE_F_NONBLOCK,
} from "./libc.ts";
import type { Syscalls } from "./posix.ts";

/** The libc calls the sink makes besides {@linkcode Syscalls}, on the JS thread. */
export interface NowCalls {
  /** `read(2)` into all of `buffer`. */
  read(fd: number, buffer: Uint8Array): number;
  /** `splice(2)` between two fds (no offsets). */
  splice(fdIn: number, fdOut: number, length: number, flags: number): number;
}

/** Waits for a pipe that had nothing: short at first, longer while it stays empty. */
const SINK_POLL_MS = [1, 1, 2, 4, 8, 16];

/**
 * A file sink that never waits inside an FFI call: it splices without waiting for the pipe
 * (`SPLICE_F_NONBLOCK`), and when the pipe is empty it tries again after a short timer (1 ms, backing
 * off to 16 ms while it stays empty). A 1 MiB pipe that skopeo fills at 1 GiB/s takes about 1 ms. The
 * flush runs on the runtime's thread pool through `node:fs` (under Bun its fds are real ones).
 *
 * @param calls The adapter's `read` and `splice`.
 * @param sys The adapter's syscalls.
 * @param fd The pipe's read end; the sink owns it.
 * @param file The opened file; the sink owns it.
 * @returns The sink.
 */
export function pollFileSink(calls: NowCalls, sys: Syscalls, fd: number, file: number): FileSink {
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
      const n = calls.read(pipe, buffer);
      if (n < 0) {
        const errno = sys.errno();
        if (errno === EAGAIN || errno === EINTR) return -1;
        throw new Error(`Reading the pipe failed: ${sys.strerror(errno)}`);
      }
      for (let offset = 0; offset < n;) {
        const written = sys.write(target, buffer.subarray(offset, n));
        if (written < 0 && sys.errno() === EINTR) continue;
        if (written <= 0) {
          throw new Error(written < 0 ? sys.strerror(sys.errno()) : "The file took no bytes");
        }
        offset += written;
      }
      return n;
    }
    const n = calls.splice(pipe, target, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n >= 0) return n;
    const errno = sys.errno();
    if (errno === EAGAIN || errno === EINTR) return -1;
    if (errno !== EINVAL) throw new Error(sys.strerror(errno));
    // Copy instead; the read end is ours alone, so making it non-blocking affects no one else.
    sys.fcntl(pipe, F_SETFL, sys.fcntl(pipe, F_GETFL, 0) | O_NONBLOCK);
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
      if (pipe >= 0) sys.close(pipe);
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
          sys.close(fileFd);
        }
      })();
      return fileClosed;
    },
  };
}
