/**
 * The GetBlob stream, verified by the proxy: exactly `size` bytes, then FinishPipe's verdict decides
 * between close and error. The same stream runs under `saveBlob`, counting the pieces an adapter
 * moved into a file instead of bytes.
 *
 * @module
 */

import { within } from "./async.ts";
import type { Connection } from "./connection.ts";
import { BlobError, ImageProxyError, RequestError } from "./errors.ts";
import { expectInteger } from "./protocol.ts";
import type { FileSink } from "./transport.ts";
import {
  type ChunkReader,
  guardedStream,
  readWithin,
  type Sized,
  STALLED,
  stallError,
  type Step,
} from "./blob-lifecycle.ts";

/** A blob being streamed from the proxy. */
export interface BlobReader {
  /** The blob's size in bytes as the proxy reports it; -1 when unknown (raw blobs only). */
  size: number;
  /**
   * The blob's bytes. It closes normally only when size and digest were confirmed; any corruption,
   * short read or proxy failure errors it with a {@linkcode BlobError} or `ProxyExitedError`.
   */
  stream: ReadableStream<Uint8Array>;
}

/** Options for a blob request. */
export interface BlobOptions {
  /** Aborting closes the pipe, settles the server side and errors the stream with the reason. */
  signal?: AbortSignal;
  /** Overrides the proxy's `blobIdleTimeoutMs` for this blob (0: wait forever). */
  idleTimeoutMs?: number;
}

/** Options for `ImageProxy.getRawBlob`. */
export interface RawBlobOptions extends BlobOptions {
  /**
   * The size the caller expects, from the blob's descriptor. A registry that sends no length makes
   * the proxy answer -1: this size then bounds the stream (more bytes fail it) and is checked at its
   * end. When the proxy does know the size and it differs, the request fails at once.
   */
  size?: number;
}

/** Options for `ImageProxy.saveBlob`. */
export interface SaveBlobOptions extends BlobOptions {
  /** Called with the number of bytes each time more of the blob reached the file. */
  onProgress?: (bytes: number) => void;
}

/** A GetBlob reply: the pipe to read, and what settles it. */
export interface OpenedBlob {
  fd: number;
  pipeid: number;
  digest: string;
  size: number;
  /** The server did not know the size (-1): FinishPipe goes out at once. */
  sizeUnknown: boolean;
}

/** Blob pipes are grown to this size: fewer, larger reads. */
export const BLOB_PIPE_SIZE = 1 << 20;
/** A pipe with less free room than a page is full: its writer is blocked in write(). */
const PAGE_SIZE = 4096;
/** How long a cancelled GetBlob stream waits for data that shows its copy is alive (see cancel). */
const CANCEL_PROBE_MS = 2000;
/**
 * The most a GetBlob stream reads past the declared size: the one read that must tell the pipe's end
 * of file from more data (the server's writer holds the pipe open until FinishPipe), plus the chunk
 * the adapter's stream may have read ahead; each is at most about a pipe's worth. Any byte past the
 * size fails the blob. Reading on would drain a source that may never end (a registry that sent zeros
 * forever made skopeo write 4.9 GB into a 256 KiB blob's file): the blob fails at once instead, and
 * our end is closed, which makes skopeo's writer fail with EPIPE and lets FinishPipe return. A file
 * sink moves a single byte past the size, so a saved file is never more than one byte too long.
 */
export const MAX_EXCESS_READ = 2 * BLOB_PIPE_SIZE;

/**
 * Sends GetBlob and checks the reply; the pipe is the caller's to read and settle.
 *
 * @throws {BlobError} when the proxy reports a size other than `size`.
 */
export async function openBlob(
  connection: Connection,
  imageId: number,
  digest: string,
  size: number,
  options: BlobOptions,
): Promise<OpenedBlob> {
  options.signal?.throwIfAborted();
  const { reply, fds } = await connection.call("GetBlob", [imageId, digest, size], "pipe");
  const [fd] = fds;
  let serverSize: number;
  try {
    serverSize = expectInteger("GetBlob", reply.value, true);
    if (serverSize >= 0 && serverSize !== size) {
      throw new BlobError(
        `Blob ${digest} has ${serverSize} bytes, but ${size} were expected`,
        digest,
        false,
      );
    }
    options.signal?.throwIfAborted();
  } catch (err) {
    await discardBlob(connection, fd, reply.pipeid);
    throw err;
  }
  return { fd, pipeid: reply.pipeid, digest, size, sizeUnknown: serverSize < 0 };
}

/** The blob's bytes as a stream that closes only once the proxy confirmed them. */
export function blobStream(
  connection: Connection,
  blob: OpenedBlob,
  options: BlobOptions,
): ReadableStream<Uint8Array> {
  const reader = connection.transport.openStream(blob.fd, { pipeSize: BLOB_PIPE_SIZE }).getReader();
  return verifiedStream(connection, blob, options, reader);
}

/**
 * Moves the blob into the file `path` through the adapter's file sink, verified as
 * {@linkcode blobStream} is. Resolves with the byte count once the proxy confirmed it and the file
 * was flushed; on failure the file is left partial.
 */
export async function saveBlobTo(
  connection: Connection,
  sinkOf: (fd: number) => FileSink,
  blob: OpenedBlob,
  path: string,
  options: SaveBlobOptions,
): Promise<number> {
  const { digest, size } = blob;
  let sink: FileSink;
  try {
    sink = sinkOf(blob.fd);
  } catch (cause) {
    await discardBlob(connection, blob.fd, blob.pipeid);
    throw new ImageProxyError(`Cannot save blob ${digest}: ${(cause as Error).message}`, { cause });
  }
  let moved = 0;
  const reader: ChunkReader<Sized> = {
    read: async () => {
      let n: number;
      try {
        // Never more than the declared size; past it, one byte tells the pipe's end from a blob too
        // long (see MAX_EXCESS_READ).
        n = await sink.move(moved < size ? Math.min(size - moved, BLOB_PIPE_SIZE) : 1);
      } catch (cause) {
        throw new ImageProxyError(`Saving blob ${digest} to "${path}" failed: ${(cause as Error).message}`, {
          cause,
        });
      }
      if (n === 0) return { done: true, value: undefined };
      moved += n;
      return { done: false, value: { length: n } };
    },
    cancel: () => {
      sink.closePipe();
      return Promise.resolve();
    },
  };
  const stream = verifiedStream(connection, blob, options, reader);
  try {
    for await (const piece of stream) options.onProgress?.(piece.length);
  } catch (err) {
    // Without a flush: a pending move (on a stalled pipe, say) closes the file when it returns.
    await sink.closeFile(false).catch(() => {});
    throw err;
  }
  try {
    await sink.closeFile(true);
  } catch (cause) {
    throw new ImageProxyError(`Flushing blob ${digest} to "${path}" failed: ${(cause as Error).message}`, {
      cause,
    });
  }
  return moved;
}

/**
 * A GetBlob stream: `size` bytes, then FinishPipe's verdict decides between close and error. The
 * chunks are those of `reader`: bytes, or the sizes of pieces a file sink moved.
 */
function verifiedStream<T extends Sized>(
  connection: Connection,
  { fd, pipeid, digest, size, sizeUnknown }: OpenedBlob,
  options: BlobOptions,
  reader: ChunkReader<T>,
): ReadableStream<T> {
  const idleMs = options.idleTimeoutMs ?? connection.timeouts.blobIdleTimeoutMs;
  let received = 0;
  let stalled = false;
  let finish: Promise<void> | undefined;
  // The server's writer holds the pipe until FinishPipe, and FinishPipe holds the server until the
  // writer is done: send it only once no more data is due (at once when the size is unknown).
  const startFinish = () => {
    finish ??= connection.finishPipe(pipeid);
    return finish;
  };
  // Past the size, the pipe ends once FinishPipe has closed the server's end; any data is one byte
  // too many (see MAX_EXCESS_READ). The release then closes our end, and skopeo's writer fails with
  // EPIPE, which settles FinishPipe: its error is expected, and handled here from the start, so that
  // it never goes unhandled while the read is pending.
  const serverVerdict = async (): Promise<void> => {
    const finished = startFinish();
    finished.catch(() => {});
    const result = await readWithin(reader, idleMs);
    if (result === STALLED) throw stallError(digest, idleMs, received, size);
    if (!result.done) throw tooLong(digest, size);
    try {
      await finished;
    } catch (err) {
      throw blobFailure(err, digest);
    }
  };
  if (sizeUnknown) startFinish().catch(() => {});
  const step = async (controller: ReadableStreamDefaultController<T>): Promise<Step> => {
    if (received < size) {
      const result = await readWithin(reader, idleMs);
      if (result === STALLED) {
        stalled = true;
        throw stallError(digest, idleMs, received, size);
      }
      if (result.done) throw await earlyEnd(connection, digest, received, size, startFinish);
      if (received + result.value.length > size) throw tooLong(digest, size);
      received += result.value.length;
      controller.enqueue(result.value);
      if (received < size) return "more";
    }
    await serverVerdict();
    return "done";
  };
  return guardedStream(connection, digest, options.signal, step, (how) => {
    if (how === "done" || finish) {
      reader.cancel().catch(() => {});
      return;
    }
    settleCancelled(connection, fd, pipeid, reader, stalled, idleMs).catch(() => {});
  });
}

/** Settles a blob pipe the caller will not read, as a cancelled blob is: its writer may be stalled. */
async function discardBlob(connection: Connection, fd: number, pipeid: number): Promise<void> {
  const reader = connection.transport.openStream(fd).getReader();
  await settleCancelled(connection, fd, pipeid, reader, false, connection.timeouts.blobIdleTimeoutMs);
}

/**
 * Settles the server side of a GetBlob stream given up before its end. FinishPipe waits for skopeo's
 * writer while holding the whole server. With our end closed, a writer that is sending ends at once
 * with EPIPE, but one reading a stalled source never does. So FinishPipe is sent only once the copy
 * shows it is alive: the pipe is full (its writer is blocked writing), or more data arrives within a
 * short probe. Otherwise the pipe is left to skopeo, whose copy ends with EPIPE if data flows again
 * and whose write end closes when it exits. Resolves once settled either way; never rejects.
 */
async function settleCancelled(
  connection: Connection,
  fd: number,
  pipeid: number,
  reader: ChunkReader<Sized>,
  stalled: boolean,
  idleMs: number,
): Promise<void> {
  let alive = false;
  if (!stalled) {
    const fill = connection.transport.pipeFill?.(fd);
    alive = fill !== undefined && fill.queued >= fill.capacity - PAGE_SIZE;
    if (!alive) {
      const probeMs = Math.min(idleMs > 0 ? idleMs : CANCEL_PROBE_MS, CANCEL_PROBE_MS);
      alive = (await within(reader.read().then((r) => !r.done, () => false), probeMs)) === true;
    }
  }
  reader.cancel().catch(() => {});
  if (!alive || connection.ended) return;
  // Guarded all the same: a source that stalls just now must not wedge the proxy for good.
  const guard = idleMs > 0 ? Math.max(idleMs, 1000) : connection.timeouts.requestTimeoutMs;
  await connection.finishPipe(pipeid, { timeoutMs: guard }).catch(() => {});
}

/** Explains a pipe that ended before `size` bytes: the proxy died, or the server gave up. */
async function earlyEnd(
  connection: Connection,
  digest: string,
  received: number,
  size: number,
  startFinish: () => Promise<void>,
): Promise<ImageProxyError> {
  const exited = await connection.exitSoon();
  if (exited) return exited;
  try {
    await startFinish();
  } catch (err) {
    return blobFailure(err, digest);
  }
  return new BlobError(`Blob ${digest} ended after ${received} of ${size} bytes`, digest, true);
}

/** The error for a blob that goes on past its declared size: never retried, the source is wrong. */
function tooLong(digest: string, size: number): BlobError {
  return new BlobError(
    `Blob ${digest} has more than the ${size} bytes expected: more data arrived after them`,
    digest,
    false,
  );
}

/** What a failed FinishPipe means for the blob. */
function blobFailure(err: unknown, digest: string): ImageProxyError {
  if (err instanceof RequestError) {
    return new BlobError(
      `Blob ${digest} failed verification by the proxy: ${err.serverMessage}`,
      digest,
      err.retryable,
      { cause: err },
    );
  }
  return err instanceof ImageProxyError ? err : new ImageProxyError(String(err), { cause: err });
}
