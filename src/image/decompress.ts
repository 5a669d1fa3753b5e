/**
 * Layer decompression chosen by content, not by media type: `docker-archive:` images carry
 * uncompressed layers that their converted manifest labels gzip, so the first bytes decide.
 *
 * Every runtime behaves the same: streams of several gzip members or zstd frames are read whole, a
 * stream cut short or corrupt errors with a {@linkcode LayerError}, and memory stays bounded on a
 * decompression bomb. gzip goes through `node:zlib`'s `createGunzip` (Deno's `DecompressionStream`
 * refuses a second member and turns 64 KiB of a bomb into one 64 MB chunk), fed at most
 * {@linkcode GZIP_PIECE} bytes at a time, so that one write never yields more than about 16 MB.
 * zstd goes through {@linkcode zstdPieces}, a few blocks at a time, to the native decoder (in a
 * worker under Deno; the system's libzstd under Node before 22.15; see `zstd.ts`).
 *
 * @module
 */

import * as zlib from "node:zlib";
import { detectRuntime, openNodeZstdDecoder } from "../runtime/detect.ts";
import { concat } from "../bytes.ts";
import { LAYER_LIMITS, LayerError } from "./errors.ts";
import { BATCH_OUTPUT, decoderZstdDecompress, workerZstdDecompress, zstdPieces } from "./zstd.ts";

/** The most compressed bytes given to gzip at once: deflate yields at most 1032 bytes for each. */
export const GZIP_PIECE = 16 * 1024;

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
 * @throws {LayerError} for bzip2 and xz, which OCI layers do not use; the stream errors with one
 * for a truncated or corrupt layer.
 */
export async function decompress(
  stream: ReadableStream<Uint8Array>,
): Promise<{ compression: Compression; stream: ReadableStream<Uint8Array> }> {
  const peeked = await peek(stream, 6);
  const compression = detectCompression(peeked.head);
  switch (compression) {
    case "gzip":
      return { compression, stream: gunzip(peeked.stream) };
    case "zstd":
      return { compression, stream: zstdDecompress(peeked.stream) };
    case "none":
      return { compression, stream: peeked.stream };
    default:
      await peeked.stream.cancel();
      throw new LayerError(`Layer is ${compression}-compressed, which OCI image layers do not use`);
  }
}

interface NodeTransform {
  write(chunk: Uint8Array, callback: () => void): boolean;
  end(): void;
  destroy(error?: Error): void;
  on(event: string, listener: (...args: never[]) => void): void;
  once(event: string, listener: () => void): void;
}

/** `input` in pieces of at most `size` bytes. */
async function* slices(input: ReadableStream<Uint8Array>, size: number): AsyncGenerator<Uint8Array> {
  const reader = input.getReader();
  let finished = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      for (let offset = 0; offset < value.length; offset += size) yield value.subarray(offset, offset + size);
    }
    finished = true;
  } finally {
    if (!finished) await reader.cancel().catch(() => {});
  }
}

/** gzip, every member: Bun's `DecompressionStream` (correct there, and faster), else `node:zlib`. */
export function gunzip(input: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  if (detectRuntime() === "bun") {
    const output = input.pipeThrough(
      new DecompressionStream("gzip") as unknown as TransformStream<Uint8Array, Uint8Array>,
    );
    const reader = output.getReader();
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        try {
          const { done, value } = await reader.read();
          if (done) controller.close();
          else controller.enqueue(value);
        } catch (err) {
          throw new LayerError(
            `Cannot decompress the gzip layer: ${(err as Error)?.message ?? err}`,
            undefined,
            {
              cause: err,
            },
          );
        }
      },
      cancel: (reason) => reader.cancel(reason),
    }, { highWaterMark: 0 });
  }
  return throughNode(zlib.createGunzip() as unknown as NodeTransform, slices(input, GZIP_PIECE), "gzip");
}

/** zstd, every frame, one block at a time. */
export function zstdDecompress(input: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  if (detectRuntime() === "deno") return workerZstdDecompress(input);
  const create = (zlib as unknown as { createZstdDecompress?: () => NodeTransform }).createZstdDecompress;
  if (typeof create !== "function") {
    if (detectRuntime() === "node") return decoderZstdDecompress(input, openLibzstd);
    throw new LayerError(
      "This runtime's node:zlib cannot decompress zstd: run Node 22.15 or newer, or a current Bun or Deno",
    );
  }
  async function* bytes() {
    let batch: Uint8Array[] = [];
    let output = 0;
    for await (const piece of zstdPieces(input)) {
      if (piece.bytes.length === 0) continue;
      batch.push(piece.bytes);
      output += piece.yields ?? 0;
      if (output >= BATCH_OUTPUT) {
        yield concat(batch);
        batch = [];
        output = 0;
      }
    }
    if (batch.length > 0) yield concat(batch);
  }
  return throughNode(create(), bytes(), "zstd");
}

/** libzstd's decoder, for Node before 22.15: every Debian system has it, since apt needs it. */
async function openLibzstd() {
  try {
    return await openNodeZstdDecoder({
      chunkBytes: LAYER_LIMITS.chunkBytes,
      windowLogMax: Math.log2(LAYER_LIMITS.zstdWindowBytes),
    });
  } catch (err) {
    throw new LayerError(
      `This Node's node:zlib cannot decompress zstd, and "libzstd.so.1" cannot be loaded: ${
        (err as Error)?.message ?? err
      }; install the libzstd1 package, or run Node 22.15 or newer`,
      undefined,
      { cause: err },
    );
  }
}

/**
 * A `node:zlib` transform as a Web stream, with backpressure both ways. What one piece yields is
 * handed on once the transform has taken the whole piece, and the next piece is written only once the
 * consumer has taken that: memory holds one piece's output at most, and a corrupt piece fails before
 * any of its output is handed on, on every runtime alike.
 */
function throughNode(
  z: NodeTransform,
  pieces: AsyncGenerator<Uint8Array>,
  format: string,
): ReadableStream<Uint8Array> {
  let pending: Uint8Array[] = [];
  let queue: Uint8Array[] = [];
  let ended = false;
  let failure: unknown;
  let wake: (() => void) | undefined;
  const notify = () => {
    wake?.();
    wake = undefined;
  };
  const sleep = () => new Promise<void>((resolve) => wake = resolve);
  const closed = new Promise<void>((resolve) => z.once("close", resolve));
  z.on("data", (chunk: Uint8Array) => pending.push(chunk));
  z.on("end", () => {
    queue.push(...pending);
    pending = [];
    ended = true;
    notify();
  });
  z.on("error", (err: unknown) => {
    failure ??= err;
    notify();
  });
  const feeding = (async () => {
    try {
      for await (const piece of pieces) {
        while (queue.length > 0 && failure === undefined) await sleep();
        if (failure !== undefined) return;
        await Promise.race([new Promise<void>((resolve) => z.write(piece, resolve)), closed]);
        if (failure !== undefined) return;
        queue = pending;
        pending = [];
        notify();
      }
      z.end();
    } catch (err) {
      failure ??= err;
      z.destroy();
      notify();
    }
  })();
  const fail = (err: unknown) =>
    err instanceof LayerError ? err : new LayerError(
      `Cannot decompress the ${format} layer: ${(err as Error)?.message ?? err}`,
      undefined,
      { cause: err },
    );
  return new ReadableStream<Uint8Array>({
    pull: async (controller) => {
      while (queue.length === 0 && !ended && failure === undefined) await sleep();
      if (queue.length > 0 && failure === undefined) {
        for (const value of queue.splice(0)) {
          controller.enqueue(new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
        }
        notify();
        return;
      }
      if (failure === undefined) await feeding;
      if (failure !== undefined) {
        await pieces.return(undefined).catch(() => {});
        throw fail(failure);
      }
      controller.close();
    },
    cancel: async () => {
      failure ??= new Error("cancelled");
      z.destroy();
      await pieces.return(undefined).catch(() => {});
    },
  }, { highWaterMark: 0 });
}
