/**
 * GNU tar's sparse files in PAX format 1.0 (`tar --sparse --format=pax`): which entries are sparse, and
 * their map of data segments, read from the start of the entry's data and checked against the entry
 * before anything of it is handed out. The older GNU formats (PAX 0.0 and 0.1) are told apart to be
 * refused by name.
 *
 * @module
 */

import { LAYER_LIMITS, LayerLimitError, TarFormatError } from "./errors.ts";
import type { SparseSegment } from "./tar.ts";

const BLOCK = 512;

/** A sparse file's facts from its PAX records (format 1.0), before its map is read. */
export interface SparseRecords {
  /** The file's real name (`GNU.sparse.name`); the header's is a stand-in. */
  name: string | undefined;
  /** The file's full size, holes included (`GNU.sparse.realsize`). */
  realSize: number;
}

/**
 * The sparse format an entry's own PAX records announce, or `undefined` for an ordinary entry.
 *
 * @throws {TarFormatError} for the sparse formats older than 1.0 and for a 1.0 header without its size.
 */
export function sparseRecords(records: Map<string, string>): SparseRecords | undefined {
  const major = records.get("GNU.sparse.major");
  const minor = records.get("GNU.sparse.minor");
  const old = records.has("GNU.sparse.size") || records.has("GNU.sparse.map") ||
    records.has("GNU.sparse.offset");
  if (major === undefined && minor === undefined && !old) return undefined;
  if (major !== "1" || minor !== "0") {
    const version = major === undefined
      ? (records.has("GNU.sparse.map") ? "0.1" : "0.0")
      : `${major}.${minor}`;
    throw new TarFormatError(`GNU sparse format "${version}" is not supported (only 1.0, GNU tar's default)`);
  }
  const text = records.get("GNU.sparse.realsize");
  if (text === undefined || !/^[0-9]{1,16}$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw new TarFormatError(`Invalid GNU.sparse.realsize ${text === undefined ? "(missing)" : `"${text}"`}`);
  }
  return { name: records.get("GNU.sparse.name"), realSize: Number(text) };
}

/**
 * Reads a sparse map (format 1.0) from the start of an entry's data: decimal numbers, one a line, the
 * count of segments first, then each segment's offset and length, padded to a whole block. Checked
 * against the entry: segments in order, not overlapping, inside `realSize`, and exactly as many data
 * bytes as the archive stores after the map.
 *
 * @param readBlock reads the next 512 bytes of the entry's data.
 * @param name the entry's name, for errors.
 * @param stored the entry's data size in the archive, map included.
 * @param realSize the file's size, holes included.
 * @returns the segments, and how many bytes of the data the map took.
 * @throws {LayerLimitError} for a map over `LAYER_LIMITS.sparseMapBytes`, before it is read.
 * @throws {TarFormatError} for a malformed map or one that does not match the entry.
 */
export async function readSparseMap(
  readBlock: () => Promise<Uint8Array>,
  name: string,
  stored: number,
  realSize: number,
): Promise<{ segments: SparseSegment[]; mapBytes: number }> {
  const invalid = (why: string) => new TarFormatError(`Invalid sparse map of "${name}": ${why}`);
  const numbers: number[] = [];
  let wanted = 1;
  let digits = "";
  let mapBytes = 0;
  while (numbers.length < wanted) {
    if (mapBytes + BLOCK > stored) throw invalid("it runs past the entry's data");
    if (mapBytes + BLOCK > LAYER_LIMITS.sparseMapBytes) {
      throw new LayerLimitError("sparseMapBytes", `The sparse map of "${name.slice(0, 40)}" is too large`);
    }
    const block = await readBlock();
    mapBytes += BLOCK;
    for (let i = 0; i < BLOCK && numbers.length < wanted; i++) {
      const byte = block[i];
      if (byte === 0x0a && digits !== "") {
        numbers.push(Number(digits));
        digits = "";
        if (numbers.length === 1) wanted = 1 + 2 * numbers[0];
      } else if (byte >= 0x30 && byte <= 0x39 && digits.length < 16) {
        digits += String.fromCharCode(byte);
      } else throw invalid("it is not a list of numbers");
    }
  }
  const segments: SparseSegment[] = [];
  let end = 0;
  let data = 0;
  for (let i = 1; i < numbers.length; i += 2) {
    const offset = numbers[i];
    const length = numbers[i + 1];
    if (!Number.isSafeInteger(offset + length) || offset < end) {
      throw invalid(`segment ${segments.length} overlaps the one before or is out of order`);
    }
    if (offset + length > realSize) {
      throw invalid(`segment ${segments.length} ends past the file's size ${realSize}`);
    }
    segments.push({ offset, length });
    end = offset + length;
    data += length;
  }
  if (mapBytes + data !== stored) {
    throw invalid(`its segments hold ${data} bytes, the archive ${stored - mapBytes}`);
  }
  return { segments, mapBytes };
}

/** Zeros for the holes of a sparse file's content, shared: readers copy what they keep. */
const ZEROS = new Uint8Array(1 << 16);

/** `count` zero bytes, in views of one shared buffer. */
export function* zeros(count: number): Generator<Uint8Array> {
  for (let left = count; left > 0; left -= ZEROS.length) {
    yield ZEROS.subarray(0, Math.min(left, ZEROS.length));
  }
}
