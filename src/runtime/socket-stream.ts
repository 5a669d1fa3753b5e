/**
 * A received pipe read from the event loop by `node:net`, which can take over a pipe fd (Deno has it,
 * and so will a Node adapter). Loaded only by the adapters that use it.
 *
 * @module
 */

import { Socket } from "node:net";

/**
 * A pipe read from the event loop: `node:net` takes the fd over (it sets O_NONBLOCK and closes it when
 * the stream ends, errors or is cancelled) and reads it when epoll says it is readable, with no
 * thread-pool hop per read. Under Deno, on skopeo 1.22, 1 GiB: 0.84-0.86 GiB/s and 0.71 s of CPU,
 * against 0.72-0.75 GiB/s and 1.07 s with pool reads. Its reads are at most 64 KiB and run on the JS
 * thread, so a reader that hashes every byte itself does better with pool reads (see `readerBusy`).
 *
 * @param fd The pipe's read end; the stream owns it.
 * @returns The pipe's bytes, as they are read.
 */
export function socketStream(fd: number): ReadableStream<Uint8Array> {
  const socket = new Socket({ fd, readable: true, writable: false });
  socket.pause();
  let settled = false;
  return new ReadableStream<Uint8Array>({
    start(controller) {
      socket.on("data", (chunk: Uint8Array) => {
        if (settled) return;
        controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
        if ((controller.desiredSize ?? 0) <= 0) socket.pause();
      });
      socket.once("end", () => {
        if (settled) return;
        settled = true;
        controller.close();
      });
      socket.once("error", (err: Error) => {
        if (settled) return;
        settled = true;
        controller.error(new Error(`Reading pipe fd ${fd} failed: ${err.message}`));
      });
    },
    pull() {
      socket.resume();
    },
    cancel() {
      settled = true;
      socket.destroy();
    },
  }, { highWaterMark: 1 });
}
