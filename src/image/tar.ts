/**
 * A small streaming tar reader: ustar, GNU long names (`L`, `K`) and PAX extended headers (`x`, `g`),
 * enough for every layer format the OCI image spec allows. It reads a Web `ReadableStream` once, holds
 * at most one chunk plus one header in memory, and hands out each entry's content as it arrives.
 * Sparse files in GNU tar's PAX format 1.0 (`--sparse --format=pax`) are read too: their map of data
 * segments is parsed and checked, and their content handed out either whole (holes as zeros) or as the
 * stored segments with their offsets, which is what an extraction writes to keep the holes.
 * Metadata is bounded by {@linkcode LAYER_LIMITS}: one PAX or long-name entry, all global PAX headers
 * together, every name and link target, and a sparse map; only the PAX keys it uses are kept, so
 * lookups cost the same whatever else a header carries.
 *
 * Written here rather than taken from npm because layer extraction needs the raw header facts (type,
 * link name, mode, PAX path) with no policy applied, works on Web streams in both runtimes, and is
 * where hostile input arrives: a few hundred lines we can read in full are the safer dependency.
 *
 * @module
 */

import { LAYER_LIMITS, LayerLimitError, TarFormatError } from "./errors.ts";
import { readSparseMap, sparseRecords, zeros } from "./tar-sparse.ts";

/** The kinds of tar entries a layer may carry. */
export type TarEntryType =
  | "file"
  | "directory"
  | "symlink"
  | "hardlink"
  | "character-device"
  | "block-device"
  | "fifo";

/** One entry's header, after GNU long names and PAX records were applied. */
export interface TarHeader {
  /** The entry's path as stored in the archive (no normalization; a directory's trailing `/` removed). */
  name: string;
  /** What the entry is. */
  type: TarEntryType;
  /** Permission bits, including setuid, setgid and sticky (`0o7777` at most). */
  mode: number;
  /** The owner's numeric id. */
  uid: number;
  /** The group's numeric id. */
  gid: number;
  /** The content's size in bytes (0 for everything but files); a sparse file's full size, holes included. */
  size: number;
  /** Modification time in seconds since the epoch (may have a fraction from PAX). */
  mtime: number;
  /** The same time in nanoseconds, exact: a PAX time's digits, never through a double. */
  mtimeNs: bigint;
  /** The target of a symlink or hardlink, as stored; empty for other types. */
  linkname: string;
  /** Device numbers of character and block devices. */
  devmajor: number;
  /** Device numbers of character and block devices. */
  devminor: number;
  /**
   * A sparse file's data segments, in order, not overlapping, inside `size`; what lies between them is a
   * hole. Absent for every other entry.
   */
  sparse?: readonly SparseSegment[];
  /**
   * Extended attributes from the entry's PAX `SCHILY.xattr.NAME` records (what GNU tar `--xattrs`
   * writes), name to value bytes, in the archive's order. Absent when there are none.
   */
  xattrs?: [string, Uint8Array][];
}

/** A run of data in a sparse file: `length` bytes at `offset`. */
export interface SparseSegment {
  /** Where the data starts in the file. */
  offset: number;
  /** How many bytes of data. */
  length: number;
}

/** A piece of a file's stored data and where it goes in the file. */
export interface TarSegment {
  /** The position of `data` in the file. */
  offset: number;
  /** The bytes (a view into the reader's buffers: copy to keep them). */
  data: Uint8Array;
}

/** One entry: its header and, for files, its content, which must be read before the next entry. */
export interface TarEntry {
  /** The entry's header. */
  header: TarHeader;
  /**
   * The content, chunk by chunk (views into the reader's buffers: copy to keep them). Files only;
   * empty for other types. What is not read is skipped when the next entry is requested.
   */
  content(): AsyncIterable<Uint8Array>;
  /**
   * The content as stored, each piece with its offset in the file: a sparse file's holes are left out,
   * so that a writer can leave them as holes. Either this or {@linkcode TarEntry.content} may be read,
   * once.
   */
  segments(): AsyncIterable<TarSegment>;
}

export { TarFormatError } from "./errors.ts";

const BLOCK = 512;
const decoder = new TextDecoder();
const encoder = new TextEncoder();

/** Buffered exact reads over a byte stream. */
class ByteReader {
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;
  #chunk: Uint8Array = new Uint8Array(0);
  #offset = 0;
  #done = false;

  constructor(stream: ReadableStream<Uint8Array>) {
    this.#reader = stream.getReader();
  }

  async #fill(): Promise<boolean> {
    while (this.#offset >= this.#chunk.length) {
      if (this.#done) return false;
      const { done, value } = await this.#reader.read();
      if (done) {
        this.#done = true;
        return false;
      }
      this.#chunk = value;
      this.#offset = 0;
    }
    return true;
  }

  /** Exactly `n` bytes, or `null` at end of stream before the first byte; throws when cut short. */
  async readExact(n: number, what: string): Promise<Uint8Array | null> {
    if (!(await this.#fill())) return null;
    if (this.#chunk.length - this.#offset >= n) {
      const out = this.#chunk.subarray(this.#offset, this.#offset + n);
      this.#offset += n;
      return out;
    }
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      if (!(await this.#fill())) throw new TarFormatError(`Archive ends in the middle of ${what}`);
      const take = Math.min(n - filled, this.#chunk.length - this.#offset);
      out.set(this.#chunk.subarray(this.#offset, this.#offset + take), filled);
      this.#offset += take;
      filled += take;
    }
    return out;
  }

  /** Up to `n` bytes as they arrive, without copying. */
  async *take(n: number, what: string): AsyncGenerator<Uint8Array> {
    let left = n;
    while (left > 0) {
      if (!(await this.#fill())) throw new TarFormatError(`Archive ends in the middle of ${what}`);
      const take = Math.min(left, this.#chunk.length - this.#offset);
      const out = this.#chunk.subarray(this.#offset, this.#offset + take);
      this.#offset += take;
      left -= take;
      yield out;
    }
  }

  async skip(n: number, what: string): Promise<void> {
    for await (const _ of this.take(n, what)) { /* discard */ }
  }

  /** Reads and discards everything left, so that the source is consumed (and verified) to its end. */
  async drain(): Promise<void> {
    this.#offset = this.#chunk.length;
    while (await this.#fill()) this.#offset = this.#chunk.length;
  }

  cancel(reason?: unknown): Promise<void> {
    return this.#reader.cancel(reason).catch(() => {});
  }
}

function field(block: Uint8Array, offset: number, length: number): string {
  const bytes = block.subarray(offset, offset + length);
  const end = bytes.indexOf(0);
  return decoder.decode(end >= 0 ? bytes.subarray(0, end) : bytes);
}

/** A numeric field: octal text, or GNU base-256 when the high bit of the first byte is set. */
function numeric(block: Uint8Array, offset: number, length: number, what: string): number {
  const bytes = block.subarray(offset, offset + length);
  if (bytes[0] & 0x80) {
    if (bytes[0] & 0x40) throw new TarFormatError(`Negative ${what} in a tar header`);
    let value = bytes[0] & 0x3f;
    for (let i = 1; i < bytes.length; i++) value = value * 256 + bytes[i];
    if (!Number.isSafeInteger(value)) throw new TarFormatError(`The ${what} in a tar header is too large`);
    return value;
  }
  const text = field(block, offset, length).trim();
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text)) throw new TarFormatError(`Invalid ${what} "${text}" in a tar header`);
  return parseInt(text, 8);
}

function checksumOk(block: Uint8Array): boolean {
  const stored = numeric(block, 148, 8, "checksum");
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const byte = i >= 148 && i < 156 ? 0x20 : block[i];
    unsigned += byte;
    signed += byte > 127 ? byte - 256 : byte;
  }
  return stored === unsigned || stored === signed;
}

/** The PAX keys an entry's header takes; others are read and dropped. */
const PAX_KEYS = new Set([
  "path",
  "linkpath",
  "size",
  "uid",
  "gid",
  "mtime",
  // GNU sparse files: format 1.0 is read; the others (0.0, 0.1) are told apart to be refused by name.
  "GNU.sparse.major",
  "GNU.sparse.minor",
  "GNU.sparse.name",
  "GNU.sparse.realsize",
  "GNU.sparse.size",
  "GNU.sparse.map",
  "GNU.sparse.offset",
]);

/** The PAX key prefix of an extended attribute (GNU tar and star). */
const XATTR_PREFIX = "SCHILY.xattr.";

/**
 * Parses PAX records (`LENGTH KEY=VALUE\n`) into `into`, keeping only {@linkcode PAX_KEYS}; with
 * `xattrs`, extended attributes go there, their values as bytes (they are binary, not UTF-8).
 *
 * @throws {TarFormatError} for malformed records.
 * @throws {LayerLimitError} when the extended attributes take more than `LAYER_LIMITS.xattrBytes`.
 */
function parsePax(data: Uint8Array, into: Map<string, string>, xattrs?: [string, Uint8Array][]): void {
  let xattrBytes = 0;
  let offset = 0;
  while (offset < data.length) {
    const space = data.indexOf(0x20, offset);
    if (space < 0) break;
    const length = parseInt(decoder.decode(data.subarray(offset, space)), 10);
    if (!Number.isSafeInteger(length) || length <= space - offset || offset + length > data.length) {
      throw new TarFormatError("Malformed PAX extended header");
    }
    const record = data.subarray(space + 1, offset + length - 1);
    const equals = record.indexOf(0x3d);
    if (equals <= 0) throw new TarFormatError("Malformed PAX record");
    const key = decoder.decode(record.subarray(0, equals));
    if (PAX_KEYS.has(key)) into.set(key, decoder.decode(record.subarray(equals + 1)));
    else if (xattrs !== undefined && key.startsWith(XATTR_PREFIX) && key.length > XATTR_PREFIX.length) {
      xattrBytes += record.length;
      if (xattrBytes > LAYER_LIMITS.xattrBytes) {
        throw new LayerLimitError(
          "xattrBytes",
          `Extended attributes of ${xattrBytes} bytes or more on one entry`,
        );
      }
      // A copy: the record is a view into the reader's buffers.
      xattrs.push([key.slice(XATTR_PREFIX.length), record.slice(equals + 1)]);
    }
    offset += length;
  }
}

/** Refuses a name or link target longer than a path can be. */
function checkPath(path: string, what: string): void {
  // A UTF-16 unit takes one to three UTF-8 bytes: encode only what may be close to the limit.
  const max = LAYER_LIMITS.pathBytes;
  if (path.length > max || (path.length * 3 > max && encoder.encode(path).length > max)) {
    throw new LayerLimitError("pathBytes", `The tar ${what} "${path.slice(0, 40)}..." is too long`);
  }
}

/** An entry's PAX records: its own over the global ones. */
interface PaxRecords {
  get(key: string): string | undefined;
}

const TYPES: Record<string, TarEntryType> = {
  "0": "file",
  "\0": "file",
  "7": "file",
  "1": "hardlink",
  "2": "symlink",
  "3": "character-device",
  "4": "block-device",
  "5": "directory",
  "6": "fifo",
};

/**
 * A PAX time (`SECONDS[.FRACTION]`) in nanoseconds, from its digits; digits past the ninth are dropped,
 * as GNU tar drops them.
 */
function paxTimeNs(text: string): bigint | undefined {
  const match = /^([0-9]{1,20})(?:\.([0-9]*))?$/.exec(text);
  if (match === null) return undefined;
  return BigInt(match[1]) * 1_000_000_000n + BigInt((match[2] ?? "").slice(0, 9).padEnd(9, "0"));
}

function paxNumber(records: PaxRecords, key: string, fallback: number): number {
  const text = records.get(key);
  if (text === undefined) return fallback;
  const value = Number(text);
  if (!Number.isFinite(value) || value < 0) throw new TarFormatError(`Invalid PAX ${key} "${text}"`);
  return value;
}

/**
 * Reads the tar archive in `stream`, entry by entry. After the end-of-archive marker the rest of the
 * stream is read and discarded, so a verifying source (a blob stream) always gets to verify.
 * Breaking out of the loop cancels the stream.
 *
 * @example Listing an archive
 * ```ts ignore
 * import { readTar } from "./tar.ts";
 * for await (const entry of readTar(stream)) console.log(entry.header.type, entry.header.name);
 * ```
 *
 * @throws {TarFormatError} for a malformed or truncated archive.
 */
export async function* readTar(stream: ReadableStream<Uint8Array>): AsyncGenerator<TarEntry> {
  const input = new ByteReader(stream);
  const globalPax = new Map<string, string>();
  let globalBytes = 0;
  let finished = false;
  try {
    let pax = new Map<string, string>();
    let xattrs: [string, Uint8Array][] = [];
    let longName: string | undefined;
    let longLink: string | undefined;
    for (;;) {
      const block = await input.readExact(BLOCK, "a header");
      if (block === null) break; // No end-of-archive marker; some writers omit it.
      if (block.every((b) => b === 0)) {
        await input.drain();
        break;
      }
      if (!checksumOk(block)) throw new TarFormatError("Invalid tar header checksum (not a tar archive?)");
      const typeflag = String.fromCharCode(block[156]);
      const size = numeric(block, 124, 12, "size");
      const padded = Math.ceil(size / BLOCK) * BLOCK;
      if (typeflag === "x" || typeflag === "g" || typeflag === "L" || typeflag === "K") {
        if (size > LAYER_LIMITS.metadataBytes) {
          throw new LayerLimitError("metadataBytes", `A tar metadata entry of ${size} bytes is too large`);
        }
        if (typeflag === "g") {
          globalBytes += size;
          if (globalBytes > LAYER_LIMITS.globalMetadataBytes) {
            throw new LayerLimitError(
              "globalMetadataBytes",
              `Global PAX headers of ${globalBytes} bytes or more are too large`,
            );
          }
        }
        const data = size === 0 ? new Uint8Array(0) : await input.readExact(padded, "a metadata entry");
        if (data === null) throw new TarFormatError("Archive ends in the middle of a metadata entry");
        const body = data.subarray(0, size);
        if (typeflag === "x") {
          pax = new Map();
          xattrs = [];
          parsePax(body, pax, xattrs);
        } else if (typeflag === "g") parsePax(body, globalPax);
        else {
          const end = body.indexOf(0);
          const text = decoder.decode(end >= 0 ? body.subarray(0, end) : body);
          if (typeflag === "L") longName = text;
          else longLink = text;
        }
        continue;
      }
      const local = pax;
      const records: PaxRecords = { get: (key) => local.get(key) ?? globalPax.get(key) };
      const localXattrs = xattrs;
      pax = new Map();
      xattrs = [];
      let type = TYPES[typeflag];
      if (typeflag === "S") {
        throw new TarFormatError('GNU sparse files of the old GNU format (type "S") are not supported');
      }
      if (type === undefined) {
        throw new TarFormatError(`Unsupported tar entry type "${typeflag}"`);
      }
      // Only an entry's own records make it sparse: a global header cannot.
      const sparseFacts = type === "file" ? sparseRecords(local) : undefined;
      const magic = field(block, 257, 6);
      let name = field(block, 0, 100);
      // The ustar prefix field; GNU tar ("ustar  ") keeps other data there.
      if (magic === "ustar" && block[263] === 0x30 && block[264] === 0x30) {
        const prefix = field(block, 345, 155);
        if (prefix) name = `${prefix}/${name}`;
      }
      name = sparseFacts?.name ?? records.get("path") ?? longName ?? name;
      const linkname = records.get("linkpath") ?? longLink ?? field(block, 157, 100);
      longName = longLink = undefined;
      checkPath(name, "name");
      checkPath(linkname, "link target");
      if (type === "file" && typeflag === "\0" && name.endsWith("/")) type = "directory";
      if (type === "directory") name = name.replace(/\/+$/, "");
      const header: TarHeader = {
        name,
        type,
        mode: numeric(block, 100, 8, "mode") & 0o7777,
        uid: paxNumber(records, "uid", numeric(block, 108, 8, "uid")),
        gid: paxNumber(records, "gid", numeric(block, 116, 8, "gid")),
        size: type === "file" ? paxNumber(records, "size", size) : 0,
        mtime: paxNumber(records, "mtime", numeric(block, 136, 12, "mtime")),
        mtimeNs: 0n,
        linkname: type === "symlink" || type === "hardlink" ? linkname : "",
        devmajor: numeric(block, 329, 8, "device number"),
        devminor: numeric(block, 337, 8, "device number"),
      };
      const paxTime = records.get("mtime");
      header.mtimeNs = paxTime === undefined
        ? BigInt(header.mtime) * 1_000_000_000n
        : paxTimeNs(paxTime) ?? BigInt(Math.round(header.mtime * 1e9)); // An exponent: rare, not exact.
      if (localXattrs.length > 0) header.xattrs = localXattrs;
      if (name.includes("\0") || linkname.includes("\0")) throw new TarFormatError("NUL in a tar name");
      // The data that follows: a PAX size overrides the header's; non-files may still carry data.
      const dataSize = type === "file" ? header.size : size;
      const dataPadded = Math.ceil(dataSize / BLOCK) * BLOCK;
      const what = `the content of "${name}"`;
      let consumed = 0;
      // A sparse file's data starts with its map; the file is as large as the map says.
      let segments: readonly SparseSegment[] = [{ offset: 0, length: dataSize }];
      if (sparseFacts !== undefined) {
        const readBlock = async () => {
          const block = await input.readExact(BLOCK, "a sparse map");
          if (block === null) throw new TarFormatError("Archive ends in the middle of a sparse map");
          return block;
        };
        const map = await readSparseMap(readBlock, name, dataSize, sparseFacts.realSize);
        consumed = map.mapBytes;
        segments = header.sparse = map.segments;
        header.size = sparseFacts.realSize;
      }
      let reading = false;
      const stored = async function* (): AsyncGenerator<TarSegment> {
        for (const segment of segments) {
          let offset = segment.offset;
          for await (const data of input.take(segment.length, what)) {
            consumed += data.length;
            yield { offset, data };
            offset += data.length;
          }
        }
      };
      const once = <T>(read: () => AsyncGenerator<T>): AsyncIterable<T> => {
        if (reading || type !== "file") return (async function* () {})();
        reading = true;
        return read();
      };
      const entry: TarEntry = {
        header,
        segments: () => once(stored),
        content: () =>
          once(async function* () {
            if (header.sparse === undefined) {
              for await (const { data } of stored()) yield data;
              return;
            }
            let position = 0;
            for await (const { offset, data } of stored()) {
              yield* zeros(offset - position);
              yield data;
              position = offset + data.length;
            }
            yield* zeros(header.size - position);
          }),
      };
      yield entry;
      await input.skip(dataPadded - consumed, what);
    }
    finished = true;
  } finally {
    if (!finished) await input.cancel();
  }
}
