/**
 * zstd for Node before 22.15, whose `node:zlib` has none: the system's libzstd (`libzstd.so.1`, which
 * every Debian system has, since apt depends on it), called through `koffi`. The core feeds it the
 * frames that `src/image/zstd.ts` parsed and takes its output in bounded chunks; libzstd checks the
 * blocks and the frame checksums. Loaded only by {@linkcode openNodeZstdDecoder} in `detect.ts`, so
 * Deno and Bun never import it.
 *
 * Each `ZSTD_decompressStream` call runs on the JS thread and yields at most one output chunk (about
 * 1 ms of work for 1 MiB), after a turn of the event loop: libuv's pool has only four threads, which
 * the proxy's replies and `node:fs` need, so decoding does not take one.
 *
 * @module
 */

import koffi from "koffi";

/** The libzstd functions used; the `ZSTD_inBuffer`/`ZSTD_outBuffer` structs are passed as raw memory. */
const SYMBOLS = {
  createDStream: "void *ZSTD_createDStream()",
  freeDStream: "size_t ZSTD_freeDStream(void *)",
  initDStream: "size_t ZSTD_initDStream(void *)",
  setParameter: "size_t ZSTD_DCtx_setParameter(void *, int, int)",
  decompressStream: "size_t ZSTD_decompressStream(void *, void *, void *)",
  isError: "unsigned int ZSTD_isError(size_t)",
  getErrorName: "const char *ZSTD_getErrorName(size_t)",
} as const;

/** `ZSTD_d_windowLogMax`, from zstd.h's `ZSTD_dParameter`. */
const ZSTD_D_WINDOW_LOG_MAX = 100;

type Func = ReturnType<ReturnType<typeof koffi.load>["func"]>;
type Libzstd = Record<keyof typeof SYMBOLS, Func>;

let libzstd: Libzstd | undefined;

function bind(): Libzstd {
  if (libzstd) return libzstd;
  const lib = koffi.load("libzstd.so.1");
  libzstd = Object.fromEntries(
    Object.entries(SYMBOLS).map(([name, prototype]) => [name, lib.func(prototype)]),
  ) as Libzstd;
  return libzstd;
}

/** What a decoder is asked for. */
export interface ZstdDecoderOptions {
  /** The most bytes one chunk of output holds. */
  chunkBytes: number;
  /** log2 of the largest window a frame may ask for (`ZSTD_d_windowLogMax`). */
  windowLogMax: number;
}

/**
 * A streaming zstd decoder: {@linkcode write} some input, then {@linkcode read} until it returns `null`.
 * Frames follow each other in one decoder. It must be freed, and is freed on the first error.
 */
export interface ZstdDecoder {
  /** Hands the decoder `input`; everything written before must have been read. */
  write(input: Uint8Array): void;
  /**
   * The next chunk of output (at most `chunkBytes`, a copy), after a turn of the event loop; `null` once
   * the input written is used up and nothing more is pending.
   *
   * @throws {Error} with libzstd's error name, for corrupt input; the decoder is then freed.
   */
  read(): Promise<Uint8Array | null>;
  /** Whether the last frame given has been decoded to its end (its checksum included). */
  readonly frameEnded: boolean;
  /** Frees the native stream; a call after the first does nothing. */
  free(): void;
}

/** A native stream not freed by its user (a stream dropped unread) is freed when collected. */
const leaked = new FinalizationRegistry<{ lib: Libzstd; stream: unknown }>(({ lib, stream }) =>
  lib.freeDStream(stream)
);

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

class LibzstdDecoder implements ZstdDecoder {
  readonly #lib: Libzstd;
  #stream: unknown;
  /** `ZSTD_inBuffer` then `ZSTD_outBuffer`: { pointer, size, pos } each, as 64-bit words. */
  readonly #structs = new BigUint64Array(new ArrayBuffer(48));
  #input = new Uint8Array(new ArrayBuffer(1 << 18));
  #inputSize = 0;
  readonly #output: Uint8Array;
  /** Whether the last call filled the output and did not end the frame, so libzstd may hold more. */
  #full = false;
  frameEnded = true;

  constructor(lib: Libzstd, options: ZstdDecoderOptions) {
    this.#lib = lib;
    this.#output = new Uint8Array(new ArrayBuffer(options.chunkBytes));
    const stream = lib.createDStream();
    if (!stream) throw new Error("ZSTD_createDStream returned NULL");
    this.#stream = stream;
    leaked.register(this, { lib, stream }, this);
    try {
      this.#check(lib.initDStream(stream));
      this.#check(lib.setParameter(stream, ZSTD_D_WINDOW_LOG_MAX, options.windowLogMax));
    } catch (err) {
      this.free();
      throw err;
    }
    this.#structs[3] = koffi.address(this.#output);
    this.#structs[4] = BigInt(options.chunkBytes);
  }

  write(input: Uint8Array): void {
    if (this.#structs[2] !== BigInt(this.#inputSize)) {
      throw new Error("zstd input written before the last was read");
    }
    if (input.length > this.#input.length) {
      this.#input = new Uint8Array(new ArrayBuffer(2 ** Math.ceil(Math.log2(input.length))));
    }
    this.#input.set(input);
    this.#inputSize = input.length;
    this.#structs[0] = koffi.address(this.#input);
    this.#structs[1] = BigInt(input.length);
    this.#structs[2] = 0n;
  }

  async read(): Promise<Uint8Array | null> {
    for (;;) {
      if (Number(this.#structs[2]) === this.#inputSize && !this.#full) return null;
      await nextTurn();
      // Freed while waiting (the stream was cancelled): the native stream is gone.
      if (this.#stream === undefined) return null;
      this.#structs[5] = 0n;
      const result = this.#lib.decompressStream(this.#stream, this.#structs.subarray(3), this.#structs);
      this.#check(result);
      const produced = Number(this.#structs[5]);
      // 0: the frame is decoded and flushed; asked again, libzstd would wait for the next frame.
      this.frameEnded = Number(result) === 0;
      this.#full = produced === this.#output.length && !this.frameEnded;
      if (produced > 0) return this.#output.slice(0, produced);
    }
  }

  free(): void {
    if (this.#stream === undefined) return;
    leaked.unregister(this);
    this.#lib.freeDStream(this.#stream);
    this.#stream = undefined;
  }

  #check(result: number | bigint): void {
    if (!this.#lib.isError(result)) return;
    const name = this.#lib.getErrorName(result) as string;
    this.free();
    throw new Error(name);
  }
}

/**
 * Opens a libzstd decoder.
 *
 * @param options the chunk size and window limit.
 * @returns a decoder at the start of a frame.
 * @throws {Error} when `libzstd.so.1` cannot be loaded (its message says why).
 */
export function openZstdDecoder(options: ZstdDecoderOptions): ZstdDecoder {
  return new LibzstdDecoder(bind(), options);
}
