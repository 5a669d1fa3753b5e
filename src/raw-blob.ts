/**
 * The GetRawBlob stream (protocol 0.2.8): the server does not hash, so this client counts and hashes
 * every byte, then reads the error pipe for the server's verdict. Retryable failures fetch the blob
 * again under the retry policy and skip what was already delivered.
 *
 * @module
 */

import { type Connection, exitError } from "./connection.ts";
import { BlobError, RequestError } from "./errors.ts";
import { createHasher } from "./hash.ts";
import { expectInteger } from "./protocol.ts";
import { readToLimit } from "./bytes.ts";
import { backoff, delay } from "./retry.ts";
import type { Hasher, Transport } from "./transport.ts";
import { BLOB_PIPE_SIZE, type BlobReader, type RawBlobOptions } from "./blob-stream.ts";
import { guardedStream, readWithin, STALLED, stallError, type Step } from "./blob-lifecycle.ts";

/** The most an error pipe may carry: a `{code, message}` JSON document. */
const MAX_ERROR_PIPE = 1 << 20;

/**
 * Sends GetRawBlob and returns the blob's stream, verified by this client.
 *
 * @throws {BlobError} when no hash for the digest's algorithm is available.
 */
export async function openRawBlob(
  connection: Connection,
  imageId: number,
  digest: string,
  options: RawBlobOptions,
): Promise<BlobReader> {
  const transport = connection.transport;
  const algorithm = digest.slice(0, digest.indexOf(":"));
  const hasher = createHasher(algorithm, transport.createHasher?.bind(transport));
  if (!hasher) {
    throw new BlobError(`Cannot verify ${digest}: no ${algorithm} implementation`, digest, false);
  }
  options.signal?.throwIfAborted();
  const { reply, fds } = await connection.call("GetRawBlob", [imageId, digest], "dual");
  const [dataFd, errorFd] = fds;
  let size: number;
  try {
    size = expectedSize(digest, expectInteger("GetRawBlob", reply.value, true), options.size);
    options.signal?.throwIfAborted();
  } catch (err) {
    for (const fd of fds) transport.closeFd(fd);
    throw err;
  }
  const first = openCopy(transport, dataFd, errorFd);
  return { size, stream: rawStream(connection, imageId, first, size, digest, hasher, options) };
}

/** The size to hold the stream to: the proxy's, else the caller's; the two must agree. */
function expectedSize(digest: string, announced: number, expected: number | undefined): number {
  if (expected === undefined || expected < 0) return announced;
  if (announced >= 0 && announced !== expected) {
    throw new BlobError(
      `Blob ${digest} has ${announced} bytes, not the ${expected} expected`,
      digest,
      false,
    );
  }
  return expected;
}

/**
 * A GetRawBlob stream: hash and count locally, then read the error pipe for the server's verdict.
 * Retryable failures (the server's `retryable` code, or a stall) fetch the blob again under the
 * retry policy and skip what was already delivered; the digest still covers every byte.
 */
function rawStream(
  connection: Connection,
  imageId: number,
  first: RawCopy,
  size: number,
  digest: string,
  hasher: Hasher,
  options: RawBlobOptions,
): ReadableStream<Uint8Array> {
  const transport = connection.transport;
  const idleMs = options.idleTimeoutMs ?? connection.timeouts.blobIdleTimeoutMs;
  const policy = connection.timeouts.retry;
  const expected = digest.slice(digest.indexOf(":") + 1);
  let copy = first;
  let attempt = 1;
  let received = 0;
  let skip = 0;

  const retryOrThrow = async (failure: BlobError): Promise<Step> => {
    if (!failure.retryable || attempt >= policy.attempts || connection.ended) throw failure;
    copy.abandon();
    await delay(backoff(policy, attempt));
    attempt++;
    const { reply, fds } = await connection.call("GetRawBlob", [imageId, digest], "dual");
    const again = expectedSize(digest, expectInteger("GetRawBlob", reply.value, true), options.size);
    copy = openCopy(transport, fds[0], fds[1]);
    if (again !== size) throw new BlobError(`Blob ${digest} changed size between attempts`, digest, false);
    skip = received;
    return "again";
  };

  const step = async (controller: ReadableStreamDefaultController<Uint8Array>): Promise<Step> => {
    const result = await readWithin(copy.reader, idleMs);
    if (result === STALLED) return await retryOrThrow(stallError(digest, idleMs, received, size));
    if (!result.done) {
      let chunk = result.value;
      if (skip > 0) {
        const dropped = Math.min(skip, chunk.length);
        skip -= dropped;
        chunk = chunk.subarray(dropped);
        if (chunk.length === 0) return "again";
      }
      if (size >= 0 && received + chunk.length > size) {
        throw new BlobError(`Blob ${digest} has more than the ${size} bytes announced`, digest, false);
      }
      received += chunk.length;
      hasher.update(chunk);
      controller.enqueue(chunk);
      return "more";
    }
    const failure = await copy.verdict();
    if (failure) {
      if (connection.exit) throw exitError(connection.exit);
      const code = failure.code === "retryable" ? "retryable" : failure.code === "EPIPE" ? "EPIPE" : "other";
      return await retryOrThrow(
        new BlobError(
          `Fetching blob ${digest} failed: ${failure.message ?? "unknown error"}`,
          digest,
          code === "retryable",
          { cause: new RequestError("GetRawBlob", failure.message ?? "", code) },
        ),
      );
    }
    if (skip > 0 || (size >= 0 && received !== size)) {
      const exited = await connection.exitSoon();
      if (exited) throw exited;
      throw new BlobError(`Blob ${digest} ended after ${received} of ${size} bytes`, digest, true);
    }
    const actual = hasher.hexDigest();
    if (actual !== expected) {
      const algorithm = digest.slice(0, digest.indexOf(":") + 1);
      throw new BlobError(
        `Blob ${digest} is corrupted: its content has the digest ${algorithm}${actual}`,
        digest,
        false,
      );
    }
    return "done";
  };
  return guardedStream(connection, digest, options.signal, step, (how) => {
    if (how !== "done") copy.abandon();
  });
}

/** One GetRawBlob copy: its data reader and its error pipe. */
interface RawCopy {
  reader: ReadableStreamDefaultReader<Uint8Array>;
  /** Reads the error pipe to its end: the server's `{code, message}`, or undefined when all went well. */
  verdict(): Promise<{ code?: string; message?: string } | undefined>;
  /** Closes the data pipe and reads the error pipe in the background only to close it. */
  abandon(): void;
}

function openCopy(transport: Transport, dataFd: number, errorFd: number): RawCopy {
  // This client hashes every byte: let the adapter read big pieces while the hash runs.
  const reader = transport.openStream(dataFd, { pipeSize: BLOB_PIPE_SIZE, readerBusy: true }).getReader();
  const errors = transport.openStream(errorFd);
  let verdict: Promise<{ code?: string; message?: string } | undefined> | undefined;
  const read = () => {
    verdict ??= (async () => {
      const text = new TextDecoder().decode(await readToLimit(errors, MAX_ERROR_PIPE, "Error pipe"));
      if (text.trim() === "") return undefined;
      try {
        const parsed = JSON.parse(text);
        if (typeof parsed === "object" && parsed !== null) return parsed;
      } catch { /* not JSON: report the text */ }
      return { code: "other", message: text.trim() };
    })();
    return verdict;
  };
  return {
    reader,
    verdict: read,
    abandon: () => {
      reader.cancel().catch(() => {});
      // The server reports EPIPE on the error pipe after an early close: not an error.
      read().catch(() => {});
    },
  };
}
