/**
 * The file operations of the OCI layout writer, none of which follows a symbolic link inside the
 * layout folder: folders are made one at a time and checked, files that may already be there are
 * checked with `lstat` and opened with `O_NOFOLLOW`, and new files get fresh names (`O_EXCL`) and are
 * renamed into place (a rename replaces a link, never writes through it).
 *
 * @module
 * @tags allow-read, allow-write
 */

import { randomUUID } from "node:crypto";
import { constants, type Stats } from "node:fs";
import { type FileHandle, lstat, mkdir, open, rename, rm } from "node:fs/promises";
import { LayoutError } from "../errors.ts";

const SYMLINK = "is a symbolic link, which the layout writer does not follow";

// Files that may already be in the layout are opened without following a link, and without blocking
// on a FIFO planted under their name. Deno drops O_NOFOLLOW when it runs with granular permissions (it
// opens the resolved path), so the lstat before and the inode check after the open are what refuse a
// link there on every runtime.
const OPEN_EXISTING = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

/** The error code of a failed `node:fs` call. */
function errorCode(err: unknown): string | undefined {
  return (err as { code?: string }).code;
}

/**
 * Creates the folders `parts` below `dir`, one at a time, and checks each is a real folder: a symbolic
 * link planted there would take the blobs anywhere. `dir` itself is the caller's choice, link or not.
 *
 * @param dir the layout folder (created with its parents when missing).
 * @param parts the folder names below it, outermost first (`["blobs", "sha256"]`).
 * @throws {LayoutError} when one of them exists as a symbolic link or as anything but a folder.
 */
export async function makeFolders(dir: string, parts: string[]): Promise<void> {
  await mkdir(dir, { recursive: true });
  let path = dir;
  for (const part of parts) {
    path = `${path}/${part}`;
    try {
      await mkdir(path);
    } catch (err) {
      if (errorCode(err) !== "EEXIST") throw err;
    }
    const info = await lstat(path);
    if (info.isSymbolicLink()) throw new LayoutError(path, SYMLINK);
    if (!info.isDirectory()) throw new LayoutError(path, "is not a directory");
  }
}

/**
 * Checks a name the layout may already hold, without following it.
 *
 * @param path the file's path inside the layout.
 * @returns its `lstat`, or `null` when there is nothing under that name.
 * @throws {LayoutError} when it is a symbolic link or anything but a regular file.
 */
export async function existingFile(path: string): Promise<Stats | null> {
  let info: Stats;
  try {
    info = await lstat(path);
  } catch (err) {
    if (errorCode(err) === "ENOENT") return null;
    throw err;
  }
  if (info.isSymbolicLink()) throw new LayoutError(path, SYMLINK);
  if (!info.isFile()) throw new LayoutError(path, "is not a regular file");
  return info;
}

/**
 * Opens a file the layout may already hold, for reading. A symbolic link or anything but a regular
 * file is refused, as is a file swapped for another while it was being opened.
 *
 * @param path the file's path inside the layout.
 * @returns the open file (the caller closes it), or `null` when there is none.
 * @throws {LayoutError} as {@linkcode existingFile}, or when the file was replaced meanwhile.
 */
export async function openExisting(path: string): Promise<FileHandle | null> {
  const before = await existingFile(path);
  if (!before) return null;
  let handle: FileHandle;
  try {
    handle = await open(path, OPEN_EXISTING);
  } catch (err) {
    if (errorCode(err) === "ELOOP") throw new LayoutError(path, SYMLINK);
    throw err;
  }
  try {
    const after = await handle.stat();
    if (after.dev !== before.dev || after.ino !== before.ino) {
      throw new LayoutError(path, "was replaced while it was being opened");
    }
  } catch (err) {
    await handle.close();
    throw err;
  }
  return handle;
}

/**
 * Reads a small layout file (`oci-layout`, `index.json`) as {@linkcode openExisting} opens it.
 *
 * @param path the file's path inside the layout.
 * @param limit the most bytes it may have.
 * @returns its text, or `null` when there is none.
 * @throws {LayoutError} as {@linkcode openExisting}, or when it is larger than `limit`.
 */
export async function readLayoutFile(path: string, limit: number): Promise<string | null> {
  const handle = await openExisting(path);
  if (!handle) return null;
  try {
    if ((await handle.stat()).size > limit) throw new LayoutError(path, `is larger than ${limit} bytes`);
    return new TextDecoder().decode(await handle.readFile());
  } finally {
    await handle.close();
  }
}

/**
 * Writes `data` to `path` through a new temporary name in the same folder, then renames it: a reader
 * never sees half a file, and a link under `path` is replaced, not written through.
 *
 * @param path where the file goes.
 * @param data its content.
 */
export async function writeAtomically(path: string, data: Uint8Array | string): Promise<void> {
  const temporary = `${path}.partial-${randomUUID()}`;
  try {
    const handle = await open(temporary, "wx", 0o644);
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, path);
  } catch (err) {
    await rm(temporary, { force: true });
    throw err;
  }
}

/**
 * The first bytes of a file this writer created (at most 8: enough to tell a compression).
 *
 * @param path the file.
 * @returns up to 8 bytes.
 */
export async function fileHead(path: string): Promise<Uint8Array> {
  const handle = await open(path, "r");
  try {
    const head = new Uint8Array(8);
    const { bytesRead } = await handle.read(head, 0, head.length, 0);
    return head.slice(0, bytesRead);
  } finally {
    await handle.close();
  }
}
