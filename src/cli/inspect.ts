/**
 * The commands that look inside an image without unpacking it: `ls`, `cat`, `export` and `platforms`.
 *
 * @module
 */

import { listImage } from "../image/view.ts";
import type { FileEntry } from "../image/view.ts";
import { readFile } from "../image/read-file.ts";
import { exportImage } from "../image/export.ts";
import { concat } from "../bytes.ts";
import { open, rm } from "node:fs/promises";
import type { CommandContext, ContextWithoutProxy } from "./commands.ts";
import { formatPlatform, listPlatforms } from "../image/platforms.ts";

const TYPE_CHARS: Record<FileEntry["type"], string> = {
  file: "-",
  dir: "d",
  symlink: "l",
  hardlink: "h",
  char: "c",
  block: "b",
  fifo: "p",
};

/** `rwxr-xr-x` with setuid, setgid and sticky shown as `tar -tv` and `ls -l` show them. */
function permissions(mode: number): string {
  const triple = (bits: number, special: boolean, letter: string) =>
    (bits & 4 ? "r" : "-") + (bits & 2 ? "w" : "-") +
    (special ? (bits & 1 ? letter : letter.toUpperCase()) : bits & 1 ? "x" : "-");
  return triple(mode >> 6, (mode & 0o4000) !== 0, "s") + triple(mode >> 3, (mode & 0o2000) !== 0, "s") +
    triple(mode, (mode & 0o1000) !== 0, "t");
}

/**
 * One line of `ls`, laid out as GNU `tar -tv --numeric-owner` lays out a member (times in UTC): a
 * hardlink's type letter is `h` and its name is followed by `link to TARGET`, as tar lists it.
 */
export function longListing(entry: FileEntry): string {
  const owner = `${entry.uid}/${entry.gid}`;
  const size = entry.type === "char" || entry.type === "block"
    ? `${entry.devmajor},${entry.devminor}`
    : String(entry.size);
  const time = new Date(Math.floor(entry.mtime) * 1000).toISOString();
  const when = `${time.slice(0, 10)} ${time.slice(11, 16)}`;
  let name = entry.type === "dir" ? `${entry.path}/` : entry.path;
  if (entry.type === "symlink") name += ` -> ${entry.linkname}`;
  if (entry.type === "hardlink") name += ` link to ${entry.linkname}`;
  return `${TYPE_CHARS[entry.type]}${permissions(entry.mode)} ${owner} ${
    size.padStart(Math.max(18 - owner.length, size.length))
  } ${when} ${name}`;
}

/** The object `ls --json` prints for an entry, one per line. */
export function jsonListing(entry: FileEntry): string {
  return JSON.stringify({
    path: entry.path,
    type: entry.type,
    mode: entry.mode,
    uid: entry.uid,
    gid: entry.gid,
    size: entry.size,
    mtime: entry.mtime,
    linkname: entry.linkname,
    layer: entry.layer,
    layerDigest: entry.layerDigest,
    ...(entry.type === "char" || entry.type === "block"
      ? { devmajor: entry.devmajor, devminor: entry.devminor }
      : {}),
  });
}

/** `ls REF [PATH] [--json]`. */
export async function ls(ctx: CommandContext): Promise<void> {
  const [, path] = ctx.args.operands;
  const format = ctx.args.json ? jsonListing : longListing;
  let batch = "";
  for await (const entry of listImage(ctx.proxy, ctx.image, { path, signal: ctx.signal })) {
    batch += `${format(entry)}\n`;
    // Written in batches: one write per line costs a promise and a syscall each.
    if (batch.length >= 1 << 16) {
      await ctx.io.writeStdout(batch);
      batch = "";
    }
  }
  if (batch !== "") await ctx.io.writeStdout(batch);
}

/** `cat REF PATH`. */
export async function cat(ctx: CommandContext): Promise<void> {
  const [, path] = ctx.args.operands;
  const stream = await readFile(ctx.proxy, ctx.image, path, { signal: ctx.signal });
  for await (const chunk of stream) await ctx.io.writeStdout(chunk);
}

/** Calls `write` with the stream's bytes in pieces of at least 64 KiB (tar headers come 512 bytes at a time). */
async function batched(stream: ReadableStream<Uint8Array>, write: (bytes: Uint8Array) => Promise<void>) {
  let pieces: Uint8Array[] = [];
  let length = 0;
  for await (const chunk of stream) {
    pieces.push(chunk);
    length += chunk.length;
    if (length >= 1 << 16) {
      await write(concat(pieces));
      pieces = [];
      length = 0;
    }
  }
  if (length > 0) await write(concat(pieces));
}

/** `export REF [-o FILE]`: the flattened file system as one tar; a failed export leaves no FILE behind. */
export async function exportCommand(ctx: CommandContext): Promise<void> {
  const stream = exportImage(ctx.proxy, ctx.image, { signal: ctx.signal });
  const output = ctx.args.output;
  if (output === undefined) {
    await batched(stream, (bytes) => ctx.io.writeStdout(bytes));
    return;
  }
  const handle = await open(output, "w", 0o644);
  try {
    await batched(stream, async (bytes) => {
      let offset = 0;
      while (offset < bytes.length) offset += (await handle.write(bytes, offset)).bytesWritten;
    });
  } catch (err) {
    await handle.close();
    await rm(output, { force: true });
    throw err;
  }
  await handle.close();
}

/** `platforms REF`: one `os/arch[/variant] DIGEST` line per platform. Returns the exit status. */
export async function platforms(ctx: ContextWithoutProxy): Promise<number> {
  const list = await listPlatforms(ctx.args.config, ctx.args.operands[0]);
  await ctx.io.writeStdout(list.map((p) => `${formatPlatform(p)} ${p.digest}\n`).join(""));
  return 0;
}
