/**
 * zstd layers, read frame by frame. A small parser walks the frame and block headers (RFC 8878) and
 * hands the decoder one block at a time, so that every runtime sees the same stream: several frames
 * (what zstd:chunked layers are made of) are read in turn, skippable frames are dropped, a stream cut
 * short or malformed is a {@linkcode LayerError}, and no block yields more than 128 KiB at once,
 * whatever its compression ratio.
 *
 * The decoder is the runtime's native `node:zlib` one, or libzstd's under Node before 22.15, whose
 * `node:zlib` has none (driven here, see {@linkcode decoderZstdDecompress}). Under Deno it runs in a worker, one decoder per
 * frame: Deno's `createZstdDecompress` throws corrupt input from a `nextTick`, where no caller can
 * catch it (the process ends), and stops at the end of the first frame it is given. (The pure
 * JavaScript `fzstd` was tried instead: 5.3 times slower than the native decoder on a 121 MB layer,
 * with no checksum check, and a cost per block proportional to the frame's window, which a layer of
 * tiny blocks turns into minutes of CPU.)
 *
 * @module
 */

import { LAYER_LIMITS, LayerError, LayerLimitError } from "./errors.ts";
import { concat } from "../bytes.ts";
import type { ZstdDecoder } from "../runtime/detect.ts";

const FRAME_MAGIC = 0xfd2fb528;
const BLOCK_MAX = 128 * 1024;

/** One piece of a zstd stream, in order: a frame header, a block's header or body, or a frame's end. */
export interface ZstdPiece {
  /** The bytes to give the decoder (empty for the end of a frame without a checksum). */
  bytes: Uint8Array;
  /** Set on a frame header. */
  start?: true;
  /** Set on a frame's end (after its checksum, if any). */
  end?: true;
  /** Set on a block's header: the most bytes the block can decompress to. */
  yields?: number;
}

function zstdError(message: string): LayerError {
  return new LayerError(`Layer is not a valid zstd stream: ${message}`);
}

/** Exact reads over a byte stream, with the offset they reached. */
class Reader {
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;
  #chunk: Uint8Array = new Uint8Array(0);
  #offset = 0;
  position = 0;

  constructor(stream: ReadableStream<Uint8Array>) {
    this.#reader = stream.getReader();
  }

  /** `n` bytes; `null` at the end of the stream before the first, an error when cut short. */
  async read(n: number): Promise<Uint8Array | null> {
    if (n === 0) return new Uint8Array(0);
    if (this.#offset === this.#chunk.length) {
      const { done, value } = await this.#reader.read();
      if (done) return null;
      this.#chunk = value;
      this.#offset = 0;
      if (value.length === 0) return this.read(n);
    }
    if (this.#chunk.length - this.#offset >= n) {
      this.#offset += n;
      this.position += n;
      return this.#chunk.subarray(this.#offset - n, this.#offset);
    }
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      if (this.#offset === this.#chunk.length) {
        const { done, value } = await this.#reader.read();
        if (done) throw zstdError(`it ends in the middle of a frame, at byte ${this.position}`);
        this.#chunk = value;
        this.#offset = 0;
      }
      const take = Math.min(n - filled, this.#chunk.length - this.#offset);
      out.set(this.#chunk.subarray(this.#offset, this.#offset + take), filled);
      this.#offset += take;
      this.position += take;
      filled += take;
    }
    return out;
  }

  async need(n: number): Promise<Uint8Array> {
    const bytes = await this.read(n);
    if (bytes === null) throw zstdError(`it ends in the middle of a frame, at byte ${this.position}`);
    return bytes;
  }

  cancel(reason?: unknown): Promise<void> {
    return this.#reader.cancel(reason).catch(() => {});
  }
}

function little(bytes: Uint8Array, offset: number, length: number): number {
  let value = 0;
  for (let i = length - 1; i >= 0; i--) value = value * 256 + bytes[offset + i];
  return value;
}

/**
 * The pieces of the zstd stream `input`, checked as far as headers tell: magic numbers, reserved
 * bits, block sizes, window size ({@linkcode LAYER_LIMITS}.zstdWindowBytes) and completeness.
 *
 * @throws {LayerError} for a malformed or truncated stream; {@linkcode LayerLimitError} for a window
 * over the limit.
 */
export async function* zstdPieces(input: ReadableStream<Uint8Array>): AsyncGenerator<ZstdPiece> {
  const reader = new Reader(input);
  let finished = false;
  try {
    for (;;) {
      const at = reader.position;
      const magicBytes = await reader.read(4);
      if (magicBytes === null) break;
      if (magicBytes.length < 4) throw zstdError(`it ends in the middle of a frame, at byte ${at}`);
      const magic = little(magicBytes, 0, 4);
      if ((magic & 0xfffffff0) >>> 0 === 0x184d2a50) {
        // A skippable frame (zstd:chunked keeps its table of contents in one): not content.
        let left = little(await reader.need(4), 0, 4);
        while (left > 0) left -= (await reader.need(Math.min(left, 1 << 16))).length;
        continue;
      }
      if (magic !== FRAME_MAGIC) throw zstdError(`no frame starts at byte ${at}`);
      const descriptor = (await reader.need(1))[0];
      if (descriptor & 0x08) throw zstdError(`a reserved bit is set in the frame at byte ${at}`);
      const single = (descriptor >> 5) & 1;
      const dictionaryBytes = [0, 1, 2, 4][descriptor & 3];
      const sizeFlag = descriptor >> 6;
      const sizeBytes = sizeFlag === 0 ? single : 1 << sizeFlag;
      const rest = await reader.need(1 - single + dictionaryBytes + sizeBytes);
      if (little(rest, 1 - single, dictionaryBytes) !== 0) {
        throw zstdError(`the frame at byte ${at} needs a dictionary`);
      }
      let window: number;
      if (single) {
        window = little(rest, dictionaryBytes, sizeBytes) + (sizeFlag === 1 ? 256 : 0);
      } else {
        const base = 2 ** (10 + (rest[0] >> 3));
        window = base + (base / 8) * (rest[0] & 7);
      }
      if (window > LAYER_LIMITS.zstdWindowBytes) {
        throw new LayerLimitError(
          "zstdWindowBytes",
          `The zstd frame at byte ${at} needs a ${window}-byte window`,
        );
      }
      const checksum = (descriptor & 0x04) !== 0;
      const header = new Uint8Array(5 + rest.length);
      header.set(magicBytes);
      header[4] = descriptor;
      header.set(rest, 5);
      yield { bytes: header, start: true };
      for (let last = false; !last;) {
        const blockAt = reader.position;
        const head = await reader.need(3);
        const value = little(head, 0, 3);
        last = (value & 1) === 1;
        const type = (value >> 1) & 3;
        const size = value >>> 3;
        if (type === 3) throw zstdError(`the block at byte ${blockAt} has the reserved type`);
        if (size > BLOCK_MAX) throw zstdError(`the block at byte ${blockAt} is larger than 128 KiB`);
        // Header and body as read (views of the input, copied once when a batch is put together).
        yield { bytes: head, yields: type === 2 ? BLOCK_MAX : size };
        yield { bytes: await reader.need(type === 1 ? 1 : size) };
      }
      const sum = checksum ? await reader.need(4) : new Uint8Array(0);
      yield { bytes: sum, end: true };
    }
    finished = true;
  } finally {
    if (!finished) await reader.cancel();
  }
}

/**
 * The worker that runs Deno's native zstd decoder. Its errors are thrown where nothing can catch them,
 * which ends the worker, not the process; each frame gets a new decoder, since one stops at the end
 * of its first frame.
 */
const WORKER_SOURCE = `
import { createZstdDecompress } from "node:zlib";
let decoder;
let chunks = [];
self.addEventListener("error", (event) => {
  event.preventDefault();
  self.postMessage({ type: "error", message: String(event.error?.message ?? event.message) });
});
// What one write yielded goes back as one message: one per 16 KiB chunk costs more than decoding.
function reply(type) {
  const bytes = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  chunks = [];
  self.postMessage({ type, bytes }, [bytes.buffer]);
}
self.onmessage = ({ data: message }) => {
  if (message.type === "start") {
    decoder = createZstdDecompress();
    decoder.on("data", (chunk) => chunks.push(chunk));
    decoder.on("end", () => reply("done"));
  } else if (message.type === "write") {
    decoder.write(message.bytes, () => reply("written"));
  } else if (message.type === "end") {
    decoder.end();
  }
};
`;

/**
 * Blocks are written to a native decoder together until they may yield this many bytes, so that one
 * write (and one chunk handed on) never yields more than {@linkcode LAYER_LIMITS}.chunkBytes.
 */
export const BATCH_OUTPUT: number = LAYER_LIMITS.chunkBytes - BLOCK_MAX;

/**
 * zstd through Deno's native decoder in a worker, fed frame by frame and about 1 MiB of output at a
 * time, so that a corrupt frame errors the stream instead of ending the process.
 *
 * @returns the decompressed stream; a corrupt frame errors it with a {@linkcode LayerError}.
 */
export function workerZstdDecompress(input: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  const pieces = zstdPieces(input);
  const url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
  const worker = new Worker(url, { type: "module" });
  const queue: Uint8Array[] = [];
  let failure: unknown;
  let waitingFor: string | undefined;
  let wake: (() => void) | undefined;
  const notify = () => {
    wake?.();
    wake = undefined;
  };
  worker.onmessage = ({ data }: MessageEvent<{ type: string; bytes?: Uint8Array; message?: string }>) => {
    if (data.type === "error") {
      // Worded as Bun's decoder words it, so that both runtimes report the same error.
      const detail = data.message!.replace(/^Zstd decompress error: /, "");
      failure ??= new LayerError(`Cannot decompress the zstd layer: ${detail}`);
    } else if (data.bytes!.length > 0) queue.push(data.bytes!);
    if (data.type === waitingFor) waitingFor = undefined;
    notify();
  };
  worker.onerror = (event: ErrorEvent) => {
    event.preventDefault();
    failure ??= zstdError(event.message.replace(/^Uncaught (Error: )?/, ""));
    notify();
  };
  const stop = () => {
    worker.terminate();
    URL.revokeObjectURL(url);
  };
  /** Posts `message` and waits for the worker's `until` reply. */
  const send = async (message: { type: string; bytes?: Uint8Array }, until?: string) => {
    waitingFor = until;
    worker.postMessage(message);
    while (waitingFor !== undefined && failure === undefined) await new Promise<void>((r) => wake = r);
    if (failure !== undefined) throw failure;
  };
  async function* drive(): AsyncGenerator<void> {
    let batch: Uint8Array[] = [];
    let output = 0;
    const flush = async () => {
      if (batch.length > 0) await send({ type: "write", bytes: concat(batch) }, "written");
      batch = [];
      output = 0;
    };
    for await (const piece of pieces) {
      if (piece.start) await send({ type: "start" });
      if (piece.bytes.length > 0) batch.push(piece.bytes);
      output += piece.yields ?? 0;
      if (piece.end) {
        await flush();
        await send({ type: "end" }, "done");
        yield;
      } else if (output >= BATCH_OUTPUT) {
        await flush();
        yield;
      }
    }
  }
  const driver = drive();
  return new ReadableStream<Uint8Array>({
    pull: async (controller) => {
      try {
        while (queue.length === 0) {
          if ((await driver.next()).done) {
            stop();
            return controller.close();
          }
        }
        for (const chunk of queue.splice(0)) controller.enqueue(chunk);
      } catch (err) {
        stop();
        await pieces.return(undefined).catch(() => {});
        throw err instanceof LayerError ? err : zstdError((err as Error)?.message ?? String(err));
      }
    },
    cancel: async () => {
      stop();
      await pieces.return(undefined).catch(() => {});
      // Cancelled before its first read, the generator never ran, nor its `finally`.
      if (!input.locked) await input.cancel().catch(() => {});
    },
  }, { highWaterMark: 0 });
}

/**
 * zstd through a decoder this program drives itself (libzstd under Node before 22.15, see
 * `src/runtime/node-zstd.ts`), fed about {@linkcode BATCH_OUTPUT} bytes of output's worth of blocks at a
 * time and a frame's end on its own, so that it sees where each frame should end.
 *
 * @param input the zstd stream.
 * @param open opens the decoder; a {@linkcode LayerError} it throws errors the stream as it is.
 * @returns the decompressed stream, in chunks of at most {@linkcode LAYER_LIMITS}.chunkBytes; a corrupt
 * or truncated frame errors it with a {@linkcode LayerError}.
 */
export function decoderZstdDecompress(
  input: ReadableStream<Uint8Array>,
  open: () => Promise<ZstdDecoder>,
): ReadableStream<Uint8Array> {
  const pieces = zstdPieces(input);
  let decoder: ZstdDecoder | undefined;
  async function* drive(native: ZstdDecoder): AsyncGenerator<Uint8Array> {
    let batch: Uint8Array[] = [];
    let output = 0;
    for await (const piece of pieces) {
      if (piece.bytes.length > 0) batch.push(piece.bytes);
      output += piece.yields ?? 0;
      if (output < BATCH_OUTPUT && !piece.end) continue;
      native.write(concat(batch));
      batch = [];
      output = 0;
      for (let chunk; (chunk = await native.read()) !== null;) yield chunk;
      if (piece.end && !native.frameEnded) throw zstdError("a frame ends before its last block is decoded");
    }
  }
  let chunks: AsyncGenerator<Uint8Array> | undefined;
  const stop = async () => {
    decoder?.free();
    await pieces.return(undefined).catch(() => {});
    // A generator never started does not run its `finally`: the input, still unlocked, is cancelled here.
    if (!input.locked) await input.cancel().catch(() => {});
  };
  return new ReadableStream<Uint8Array>({
    start: async () => {
      try {
        decoder = await open();
      } catch (err) {
        await stop();
        throw err;
      }
      chunks = drive(decoder);
    },
    pull: async (controller) => {
      try {
        const { done, value } = await chunks!.next();
        if (!done) return controller.enqueue(value);
        decoder!.free();
        controller.close();
      } catch (err) {
        await stop();
        throw err instanceof LayerError
          ? err
          : new LayerError(`Cannot decompress the zstd layer: ${(err as Error)?.message ?? err}`, undefined, {
            cause: err,
          });
      }
    },
    cancel: stop,
  }, { highWaterMark: 0 });
}
