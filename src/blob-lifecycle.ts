/**
 * What every blob stream shares, GetBlob's and GetRawBlob's alike: the abort signal, shutdown,
 * cancellation and exactly one release that tells how the stream ended, plus the idle read.
 *
 * @module
 */

import { within } from "./async.ts";
import { BlobError, ProxyClosedError } from "./errors.ts";
import type { Connection } from "./connection.ts";

/** What the blob streams count: a chunk of bytes, or the size of a piece moved into a file. */
export interface Sized {
  readonly length: number;
}

/** The part of a stream reader the blob streams use. */
export interface ChunkReader<T extends Sized> {
  read(): Promise<ReadableStreamReadResult<T>>;
  cancel(): Promise<void>;
}

/** What one step of a blob stream did: enqueued a chunk, nothing yet, or reached a confirmed end. */
export type Step = "more" | "again" | "done";

/** How a blob stream ended, told once to its release. */
export type Ending = "done" | "failed" | "cancelled";

/** What {@linkcode readWithin} returns when no data came in time. */
export const STALLED: unique symbol = Symbol("stalled");

/** Reads one chunk, or gives up after `ms` without data (0: wait forever). */
export async function readWithin<T extends Sized>(
  reader: ChunkReader<T>,
  ms: number,
): Promise<ReadableStreamReadResult<T> | typeof STALLED> {
  if (ms <= 0) return await reader.read();
  return (await within(reader.read(), ms)) ?? STALLED;
}

/** The error for a blob whose source sent nothing for `ms`: retryable, as a stalled registry is. */
export function stallError(digest: string, ms: number, received: number, size: number): BlobError {
  const of = size >= 0 ? ` of ${size}` : "";
  return new BlobError(
    `Blob ${digest} stalled: no data for ${ms} ms after ${received}${of} bytes`,
    digest,
    true,
  );
}

/**
 * A stream driven by `step`, ended by the abort signal, the connection's close or the reader's
 * cancel, with exactly one `release` call that tells how it ended, so the server side is settled
 * exactly once.
 */
export function guardedStream<T>(
  connection: Connection,
  digest: string,
  signal: AbortSignal | undefined,
  step: (controller: ReadableStreamDefaultController<T>) => Promise<Step>,
  release: (how: Ending) => void,
): ReadableStream<T> {
  let settled = false;
  let controllerRef: ReadableStreamDefaultController<T> | undefined;
  const settle = (how: Ending): boolean => {
    if (settled) return false;
    settled = true;
    untrack();
    signal?.removeEventListener("abort", onAbort);
    release(how);
    return true;
  };
  const fail = (err: unknown) => {
    if (!settle("failed")) return;
    try {
      controllerRef?.error(err);
    } catch { /* already closed */ }
  };
  const onAbort = () => fail(signal?.reason);
  const untrack = connection.track(() =>
    fail(new ProxyClosedError(`The image proxy was shut down while blob ${digest} was open`))
  );
  signal?.addEventListener("abort", onAbort, { once: true });
  return new ReadableStream<T>({
    start: (controller) => {
      controllerRef = controller;
    },
    pull: async (controller) => {
      if (settled) return;
      try {
        // A pull that enqueues nothing is not called again: go on until a chunk or the end.
        let result: Step;
        do result = await step(controller); while (result === "again" && !settled);
        if (result === "done" && settle("done")) controller.close();
      } catch (err) {
        if (settle("failed")) throw err;
      }
    },
    cancel: () => {
      settle("cancelled");
    },
  }, { highWaterMark: 0 });
}
