/**
 * A small tar writer: POSIX ustar headers, with a PAX extended header before any entry whose name,
 * link name, size, ids or time do not fit the ustar fields (long names, files of 8 GiB and more,
 * fractional times), and sparse files as GNU tar writes them. What GNU tar, bsdtar and Go's
 * archive/tar read.
 *
 * @module
 */

import type { SparseSegment, TarHeader } from "./tar.ts";

const BLOCK = 512;
const encoder = new TextEncoder();

const TYPE_FLAGS: Record<TarHeader["type"], string> = {
  file: "0",
  hardlink: "1",
  symlink: "2",
  "character-device": "3",
  "block-device": "4",
  directory: "5",
  fifo: "6",
};

/** Whether `value` fits an octal field of `length` bytes (with its terminating NUL). */
function fitsOctal(value: number, length: number): boolean {
  return Number.isSafeInteger(value) && value >= 0 && value < 8 ** (length - 1);
}

function putText(block: Uint8Array, text: string | Uint8Array, offset: number, length: number): void {
  const bytes = typeof text === "string" ? encoder.encode(text) : text;
  block.set(bytes.subarray(0, length), offset);
}

function putOctal(block: Uint8Array, value: number, offset: number, length: number): void {
  putText(
    block,
    `${(fitsOctal(value, length) ? value : 0).toString(8).padStart(length - 1, "0")}\0`,
    offset,
    length,
  );
}

/** A PAX record `LENGTH KEY=VALUE\n`, whose length counts its own digits. */
function paxRecord(key: string, value: string): string {
  const body = encoder.encode(` ${key}=${value}\n`).length;
  let length = body + 1;
  while (String(length).length + body !== length) length++;
  return `${length} ${key}=${value}\n`;
}

/** Splits `name` into ustar's prefix (up to 155 bytes) and name (up to 100), or `null` when it cannot. */
function splitName(name: string): [string, string] | null {
  const bytes = encoder.encode(name);
  if (bytes.length <= 100) return ["", name];
  for (let i = name.length - 1; i > 0; i--) {
    if (name[i] !== "/") continue;
    const prefix = name.slice(0, i);
    const rest = name.slice(i + 1);
    if (encoder.encode(prefix).length <= 155 && encoder.encode(rest).length <= 100 && rest !== "") {
      return [prefix, rest];
    }
  }
  return null;
}

function header(fields: {
  name: string;
  prefix: string;
  type: string;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  linkname: string;
  devmajor: number;
  devminor: number;
}): Uint8Array {
  const block = new Uint8Array(BLOCK);
  putText(block, fields.name, 0, 100);
  putOctal(block, fields.mode, 100, 8);
  putOctal(block, fields.uid, 108, 8);
  putOctal(block, fields.gid, 116, 8);
  putOctal(block, fields.size, 124, 12);
  putOctal(block, Math.floor(fields.mtime), 136, 12);
  putText(block, "        ", 148, 8);
  putText(block, fields.type, 156, 1);
  putText(block, fields.linkname, 157, 100);
  putText(block, "ustar\0" + "00", 257, 8);
  putOctal(block, fields.devmajor, 329, 8);
  putOctal(block, fields.devminor, 337, 8);
  putText(block, fields.prefix, 345, 155);
  let sum = 0;
  for (const byte of block) sum += byte;
  putText(block, `${sum.toString(8).padStart(6, "0")}\0 `, 148, 8);
  return block;
}

/**
 * A sparse file's map as GNU tar writes it at the start of the stored data (PAX format 1.0): the
 * count, then each segment's offset and length, one number a line, padded to a whole block.
 */
export function sparseMapBlocks(segments: readonly SparseSegment[]): Uint8Array {
  const text = [segments.length, ...segments.flatMap((s) => [s.offset, s.length])].join("\n") + "\n";
  const bytes = encoder.encode(text);
  const out = new Uint8Array(bytes.length + padding(bytes.length));
  out.set(bytes);
  return out;
}

/** The bytes a file's entry stores: its content, or for a sparse file its map and its data segments. */
export function storedSize(entry: TarHeader): number {
  if (entry.type !== "file") return 0;
  if (entry.sparse === undefined) return entry.size;
  return sparseMapBlocks(entry.sparse).length + entry.sparse.reduce((n, s) => n + s.length, 0);
}

/**
 * The header block(s) for `entry`: a PAX extended header first when a value does not fit ustar,
 * then the ustar header. `entry.name` is written as given (a directory gets a trailing `/`). A sparse
 * file is written as GNU tar writes it (PAX format 1.0): its data is then its map and its segments.
 */
export function tarHeaderBlocks(entry: TarHeader): Uint8Array {
  let name = entry.type === "directory" && !entry.name.endsWith("/") ? `${entry.name}/` : entry.name;
  const records: string[] = [];
  if (entry.type === "file" && entry.sparse !== undefined) {
    records.push(
      paxRecord("GNU.sparse.major", "1"),
      paxRecord("GNU.sparse.minor", "0"),
      paxRecord("GNU.sparse.name", name),
      paxRecord("GNU.sparse.realsize", String(entry.size)),
    );
    // GNU tar's own stand-in name, so that a reader without sparse support extracts no wrong file.
    const slash = name.lastIndexOf("/");
    name = `${name.slice(0, slash + 1)}GNUSparseFile.0/${name.slice(slash + 1)}`;
  }
  const split = splitName(name);
  if (split === null) records.push(paxRecord("path", name));
  if (encoder.encode(entry.linkname).length > 100) records.push(paxRecord("linkpath", entry.linkname));
  const size = storedSize(entry);
  if (!fitsOctal(size, 12)) records.push(paxRecord("size", String(size)));
  if (!fitsOctal(entry.uid, 8)) records.push(paxRecord("uid", String(entry.uid)));
  if (!fitsOctal(entry.gid, 8)) records.push(paxRecord("gid", String(entry.gid)));
  if (!Number.isInteger(entry.mtime) || !fitsOctal(entry.mtime, 12)) {
    records.push(paxRecord("mtime", String(entry.mtime)));
  }
  const [prefix, short] = split ?? ["", name.slice(-100)];
  const main = header({
    name: short,
    prefix,
    type: TYPE_FLAGS[entry.type],
    mode: entry.mode,
    uid: entry.uid,
    gid: entry.gid,
    size,
    mtime: entry.mtime,
    linkname: entry.linkname,
    devmajor: entry.devmajor,
    devminor: entry.devminor,
  });
  if (records.length === 0) return main;
  const data = encoder.encode(records.join(""));
  const pax = header({
    name: `PaxHeaders/${short}`.slice(0, 100),
    prefix: "",
    type: "x",
    mode: 0o644,
    uid: 0,
    gid: 0,
    size: data.length,
    mtime: 0,
    linkname: "",
    devmajor: 0,
    devminor: 0,
  });
  const out = new Uint8Array(BLOCK + padding(data.length) + data.length + BLOCK);
  out.set(pax, 0);
  out.set(data, BLOCK);
  out.set(main, BLOCK + data.length + padding(data.length));
  return out;
}

/** The zero bytes that pad `size` bytes of content to a whole block. */
export function padding(size: number): number {
  return (BLOCK - (size % BLOCK)) % BLOCK;
}

/** The end-of-archive marker: two zero blocks. */
export const END_OF_ARCHIVE: Uint8Array = new Uint8Array(2 * BLOCK);
