/**
 * zstd layers, read frame by frame. A small parser walks the frame and block headers (RFC 8878) and
 * hands the decoder one block at a time, so that every runtime sees the same stream: several frames
 * (what zstd:chunked layers are made of) are read in turn, skippable frames are dropped, a stream cut
 * short or malformed is a {@linkcode LayerError}, and no block yields more than 128 KiB at once,
 * whatever its compression ratio.
 *
 * The decoder is Bun's native `node:zlib` one where it is correct (Bun), and the pure JavaScript
 * `fzstd` elsewhere: Deno's `createZstdDecompress` throws corrupt input at the top level, where no
 * caller can catch it, and stops at the end of the first frame. `fzstd` does not check frame
 * checksums, so they are checked here with {@linkcode XxHash64}.
 *
 * @module
 */

import { LAYER_LIMITS, LayerError, LayerLimitError } from "./errors.ts";
import { XxHash64 } from "./xxhash64.ts";

const FRAME_MAGIC = 0xfd2fb528;
const BLOCK_MAX = 128 * 1024;

/** One piece of a zstd stream, in order: a frame header, a block, or a frame's end. */
export interface ZstdPiece {
  /** The bytes to give the decoder (empty for the end of a frame without a checksum). */
  bytes: Uint8Array;
  /** Set on a frame header: whether the frame ends with a checksum. */
  start?: { checksum: boolean };
  /** Set on a frame's end: its checksum, when it has one. */
  end?: { checksum: number | undefined };
  /** Set on a block: the most bytes it can decompress to. */
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
      yield { bytes: header, start: { checksum } };
      for (let last = false; !last;) {
        const blockAt = reader.position;
        const head = await reader.need(3);
        const value = little(head, 0, 3);
        last = (value & 1) === 1;
        const type = (value >> 1) & 3;
        const size = value >>> 3;
        if (type === 3) throw zstdError(`the block at byte ${blockAt} has the reserved type`);
        if (size > BLOCK_MAX) throw zstdError(`the block at byte ${blockAt} is larger than 128 KiB`);
        const body = await reader.need(type === 1 ? 1 : size);
        const block = new Uint8Array(3 + body.length);
        block.set(head);
        block.set(body, 3);
        yield { bytes: block, yields: type === 2 ? BLOCK_MAX : size };
      }
      const sum = checksum ? await reader.need(4) : new Uint8Array(0);
      yield { bytes: sum, end: { checksum: checksum ? little(sum, 0, 4) : undefined } };
    }
    finished = true;
  } finally {
    if (!finished) await reader.cancel();
  }
}

interface Fzstd {
  Decompress: new (ondata: (chunk: Uint8Array, final: boolean) => void) => {
    push(chunk: Uint8Array, final?: boolean): void;
  };
}

/**
 * zstd through `fzstd`, one block per push, with the frame checksums checked here.
 *
 * @returns the decompressed stream; a corrupt frame errors it with a {@linkcode LayerError}.
 */
export function fzstdDecompress(input: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  const pieces = zstdPieces(input);
  let decoder: InstanceType<Fzstd["Decompress"]> | undefined;
  let hash: XxHash64 | undefined;
  const out: Uint8Array[] = [];
  return new ReadableStream<Uint8Array>({
    pull: async (controller) => {
      try {
        if (decoder === undefined) {
          // Loaded only where it is used: Bun never needs it. fzstd: MIT, pure JavaScript, no dependencies.
          // deno-lint-ignore no-import-prefix
          const { Decompress } = (await import("npm:fzstd@0.1.1")) as Fzstd;
          decoder = new Decompress((chunk) => {
            if (chunk.length === 0) return;
            hash?.update(chunk);
            out.push(chunk);
          });
        }
        while (out.length === 0) {
          const next = await pieces.next();
          if (next.done) {
            decoder.push(new Uint8Array(0), true);
            if (out.length === 0) return controller.close();
            break;
          }
          const piece = next.value;
          if (piece.start) hash = piece.start.checksum ? new XxHash64() : undefined;
          decoder.push(piece.bytes);
          if (piece.end?.checksum !== undefined && hash!.digestLow32() !== piece.end.checksum) {
            throw zstdError("a frame's content does not match its checksum");
          }
        }
        for (const chunk of out.splice(0)) controller.enqueue(chunk);
      } catch (err) {
        await pieces.return(undefined).catch(() => {});
        if (err instanceof LayerError) throw err;
        throw zstdError((err as Error)?.message ?? String(err));
      }
    },
    cancel: async () => {
      await pieces.return(undefined).catch(() => {});
    },
  }, { highWaterMark: 0 });
}
