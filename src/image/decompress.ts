/**
 * Layer decompression chosen by content, not by media type: `docker-archive:` images carry
 * uncompressed layers that their converted manifest labels gzip, so the first bytes decide.
 *
 * gzip goes through the platform's `DecompressionStream`. zstd goes through `node:zlib`'s
 * `createZstdDecompress`, which Deno and Bun both provide natively (measured here on a 400 MB
 * layer: 500-700 MB/s, against 90-140 MB/s for the pure JavaScript `fzstd`), so no dependency is needed.
 *
 * @module
 */

import * as zlib from "node:zlib";

/** How a layer's bytes are compressed, as its first bytes say. */
export type Compression = "gzip" | "zstd" | "none";

/** Detects the compression of a blob from its first bytes; anything unknown is taken as a plain tar. */
export function detectCompression(head: Uint8Array): Compression | "bzip2" | "xz" {
  if (head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd) return "zstd";
  if (head[0] === 0x42 && head[1] === 0x5a && head[2] === 0x68) return "bzip2";
  if (head[0] === 0xfd && head[1] === 0x37 && head[2] === 0x7a && head[3] === 0x58 && head[4] === 0x5a) {
    return "xz";
  }
  return "none";
}

/**
 * Reads the first `count` bytes of `stream` (fewer if it is shorter) and returns them with a stream
 * that yields the whole content again, from the first byte.
 */
export async function peek(
  stream: ReadableStream<Uint8Array>,
  count: number,
): Promise<{ head: Uint8Array; stream: ReadableStream<Uint8Array> }> {
  const reader = stream.getReader();
  const chunks: Uint8Array[] = [];
  let length = 0;
  let done = false;
  while (length < count) {
    const result = await reader.read();
    if (result.done) {
      done = true;
      break;
    }
    chunks.push(result.value);
    length += result.value.length;
  }
  const head = new Uint8Array(Math.min(count, length));
  let offset = 0;
  for (const chunk of chunks) {
    if (offset >= head.length) break;
    const take = Math.min(chunk.length, head.length - offset);
    head.set(chunk.subarray(0, take), offset);
    offset += take;
  }
  const replay = new ReadableStream<Uint8Array>({
    pull: async (controller) => {
      const next = chunks.shift();
      if (next) return controller.enqueue(next);
      if (done) return controller.close();
      const result = await reader.read();
      if (result.done) controller.close();
      else controller.enqueue(result.value);
    },
    cancel: (reason) => reader.cancel(reason),
  }, { highWaterMark: 0 });
  return { head, stream: replay };
}

/**
 * Decompresses `stream` according to its first bytes (gzip, zstd or none).
 *
 * @returns the compression found and the decompressed stream.
 * @throws {Error} for bzip2 and xz, which OCI layers do not use.
 */
export async function decompress(
  stream: ReadableStream<Uint8Array>,
): Promise<{ compression: Compression; stream: ReadableStream<Uint8Array> }> {
  const peeked = await peek(stream, 6);
  const compression = detectCompression(peeked.head);
  switch (compression) {
    case "gzip":
      return {
        compression,
        stream: peeked.stream.pipeThrough(
          new DecompressionStream("gzip") as unknown as TransformStream<Uint8Array, Uint8Array>,
        ),
      };
    case "zstd":
      return { compression, stream: zstdDecompress(peeked.stream) };
    case "none":
      return { compression, stream: peeked.stream };
    default:
      await peeked.stream.cancel();
      throw new Error(`Layer is ${compression}-compressed, which OCI image layers do not use`);
  }
}

interface NodeTransform {
  write(chunk: Uint8Array): boolean;
  end(): void;
  destroy(error?: Error): void;
  once(event: string, listener: (...args: unknown[]) => void): void;
  [Symbol.asyncIterator](): AsyncIterator<Uint8Array>;
}

/** zstd through `node:zlib`, as a Web stream with backpressure both ways. */
export function zstdDecompress(input: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  const create = (zlib as unknown as { createZstdDecompress?: () => NodeTransform }).createZstdDecompress;
  if (typeof create !== "function") {
    throw new Error(
      "This runtime's node:zlib cannot decompress zstd: upgrade Deno or Bun to a current release",
    );
  }
  const z = create();
  const reader = input.getReader();
  let stopped = false;
  const waitDrain = () =>
    new Promise<void>((resolve) => {
      z.once("drain", () => resolve());
      z.once("close", () => resolve());
    });
  const feeding = (async () => {
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (stopped) return;
        if (done) break;
        if (!z.write(value)) await waitDrain();
      }
      z.end();
    } catch (err) {
      z.destroy(err instanceof Error ? err : new Error(String(err)));
    }
  })();
  const output = z[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    pull: async (controller) => {
      const { done, value } = await output.next();
      if (done) {
        await feeding;
        controller.close();
      } else {
        controller.enqueue(new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
      }
    },
    cancel: async (reason) => {
      stopped = true;
      z.destroy();
      await reader.cancel(reason).catch(() => {});
    },
  }, { highWaterMark: 0 });
}
