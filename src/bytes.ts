/**
 * Joining byte chunks and reading a stream to a limit, shared by the core, the adapters and the tests.
 *
 * @module
 */

import { ProtocolError } from "./errors.ts";

/** The chunks as one array (the only chunk itself when there is one). */
export function concat(chunks: Uint8Array[]): Uint8Array {
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

/**
 * Reads `stream` to its end into one array that owns exactly its bytes. An adapter may hand out
 * chunks that are views of a large read buffer: a small payload kept as such a view would keep the
 * whole buffer alive for as long as the caller holds it, so a lone view is copied.
 *
 * @param stream The stream to read; cancelled when the limit is passed.
 * @param limit The most bytes accepted.
 * @param what Who sent the bytes, for the error (`"GetManifest"`).
 * @returns The bytes, in an `ArrayBuffer` of their own size.
 * @throws {ProtocolError} when the stream holds more than `limit` bytes.
 */
export async function readToLimit(
  stream: ReadableStream<Uint8Array>,
  limit: number,
  what: string,
): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let length = 0;
  for await (const chunk of stream) {
    length += chunk.length;
    if (length > limit) throw new ProtocolError(`${what} sent more than ${limit} bytes`);
    chunks.push(chunk);
  }
  const bytes = concat(chunks);
  return bytes.byteLength === bytes.buffer.byteLength ? bytes : bytes.slice();
}
