/**
 * The target directory of an extraction: every path a layer names is resolved on disk, one checked
 * step at a time, and never leaves it. Also what removes and finishes paths there.
 *
 * @module
 */

import { chmod, lstat, mkdir, open, readdir, realpath, rm, rmdir, stat } from "node:fs/promises";
import process from "node:process";
import { LAYER_LIMITS, LayerError, LayerLimitError, UnsafeEntryError } from "./errors.ts";
import type { WrittenNode } from "./paths.ts";
import { EntryMetadata } from "./metadata.ts";

export function unsafe(name: string, reason: string): UnsafeEntryError {
  return new UnsafeEntryError(name, reason);
}

/**
 * Splits a path from the archive into components, refusing absolute paths and `..`.
 *
 * @param path an entry name or a hardlink target.
 * @param entry the entry to name in the error.
 * @param what how the message refers to `path`.
 */
export function components(path: string, entry = path, what = "it"): string[] {
  if (path.startsWith("/")) throw unsafe(entry, `${what} is an absolute path`);
  const parts = path.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) {
    throw unsafe(entry, `${what} contains ".." and could escape the target directory`);
  }
  if (parts.length > LAYER_LIMITS.pathComponents) {
    throw new LayerLimitError(
      "pathComponents",
      `Layer entry "${entry.slice(0, 40)}..." has too many components`,
    );
  }
  return parts;
}

export function isMissing(err: unknown): boolean {
  const code = (err as { code?: string })?.code;
  return code === "ENOENT" || code === "ENOTDIR";
}

/** The names in `dir`, none when it does not exist. */
export async function readdirOrEmpty(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (err) {
    if (isMissing(err)) return [];
    throw err;
  }
}

export async function lstatOrNull(path: string) {
  try {
    return await lstat(path);
  } catch (err) {
    if (isMissing(err)) return null;
    throw err;
  }
}

/** A directory already resolved in this layer, with those resolved below it. */
interface ResolvedNode {
  real: string;
  children?: Map<string, ResolvedNode>;
}

/** Resolves paths inside one target directory, on disk, never leaving it. */
export class Target {
  readonly root: string;
  /** Directories already resolved, as a tree of archive path components (one step per component). */
  #resolved: ResolvedNode;

  constructor(root: string) {
    this.root = root;
    this.#resolved = { real: root };
  }

  static async open(dir: string): Promise<Target> {
    await mkdir(dir, { recursive: true });
    return new Target(await realpath(dir));
  }

  inside(real: string): boolean {
    return real === this.root || real.startsWith(this.root.endsWith("/") ? this.root : `${this.root}/`);
  }

  /** The components of `real`, a real path inside the target, relative to it. */
  relative(real: string): string[] {
    if (real === this.root) return [];
    return real.slice(this.root.endsWith("/") ? this.root.length : this.root.length + 1).split("/");
  }

  forget(): void {
    this.#resolved = { real: this.root };
  }

  /**
   * The real path of the directory `parts` names, each step checked: a symlink is followed only when
   * it leads to a directory inside the target. With `create`, missing directories are made (0755);
   * without, a missing one yields `null`.
   */
  async directory(entry: string, parts: string[], create: boolean): Promise<string | null> {
    let node = this.#resolved;
    for (let i = 0; i < parts.length; i++) {
      const known = node.children?.get(parts[i]);
      if (known !== undefined) {
        node = known;
        continue;
      }
      const path = `${node.real}/${parts[i]}`;
      const key = () => parts.slice(0, i + 1).join("/");
      let current: string;
      const info = await lstatOrNull(path);
      if (info === null) {
        if (!create) return null;
        await mkdir(path, { mode: 0o755 });
        current = path;
      } else if (info.isSymbolicLink()) {
        let real: string;
        try {
          real = await realpath(path);
        } catch {
          throw unsafe(entry, `its parent "${key()}" is a symlink that does not resolve`);
        }
        if (!this.inside(real)) {
          throw unsafe(entry, `its parent "${key()}" is a symlink pointing outside the target directory`);
        }
        if (!(await stat(real)).isDirectory()) {
          throw unsafe(entry, `its parent "${key()}" is a symlink to something that is not a directory`);
        }
        current = real;
      } else if (info.isDirectory()) {
        current = path;
      } else {
        throw new LayerError(`Cannot create layer entry "${entry}": "${key()}" is not a directory`);
      }
      const child: ResolvedNode = { real: current };
      (node.children ??= new Map()).set(parts[i], child);
      node = child;
    }
    return node.real;
  }
}

/** Removes whatever is at `path` (never following a symlink). */
export async function remove(path: string): Promise<void> {
  await rm(path, { recursive: true, force: true });
}

/**
 * Removes what layers wrote at `path`: everything when `node` is undefined, else only the paths the
 * tree under `node` names, so that a directory keeps what was there before the image.
 */
export async function removeWritten(path: string, node: WrittenNode | undefined): Promise<void> {
  if (node === undefined) return await remove(path);
  const info = await lstatOrNull(path);
  if (info === null) return;
  if (!info.isDirectory()) return await remove(path);
  for (const [name, child] of node.children ?? []) await removeWritten(`${path}/${name}`, child);
  try {
    await rmdir(path);
  } catch (err) {
    const code = (err as { code?: string })?.code;
    if (code !== "ENOTEMPTY" && code !== "EEXIST" && !isMissing(err)) throw err;
  }
}

/** Writes all of `chunk` at the file's position, or at `position` when given (a positional write). */
export async function writeAll(
  handle: Awaited<ReturnType<typeof open>>,
  chunk: Uint8Array,
  position?: number,
): Promise<void> {
  let offset = 0;
  while (offset < chunk.length) {
    const at = position === undefined ? null : position + offset;
    const { bytesWritten } = await handle.write(chunk, offset, chunk.length - offset, at);
    offset += bytesWritten;
  }
}

/**
 * Directory modes and times waiting to be applied, by real path (`mtimeNs`, when known, is the time
 * to the nanosecond).
 */
export type DirectoryModes = Map<string, { mode: number; mtime: number; mtimeNs?: bigint }>;

/**
 * Applies every pending directory mode and time, deepest first.
 *
 * @param modes the pending modes; emptied.
 * @param metadata what sets times (default: the runtime's calls, else `node:fs`).
 */
export async function applyDirectoryModes(modes: DirectoryModes, metadata?: EntryMetadata): Promise<void> {
  metadata ??= await EntryMetadata.open({ xattrs: false, asRoot: false });
  const paths = [...modes.keys()].sort((a, b) => b.length - a.length);
  for (const path of paths) {
    const pending = modes.get(path)!;
    try {
      // A later entry may have replaced the directory, or one of its parents, with a symlink: chmod
      // follows symlinks, so only a path that is still exactly this directory is touched.
      if ((await realpath(path)) !== path || !(await lstat(path)).isDirectory()) continue;
      await chmod(path, pending.mode);
      await metadata.times(path, pending);
    } catch (err) {
      if (!isMissing(err)) throw err;
    }
  }
  modes.clear();
}

/**
 * Whether this process runs with uid 0, so that it may keep the layers' owners. Deno asks for
 * `--allow-sys` to tell the uid (and for every permission to read `/proc/self`), so without it the
 * answer is the owner of a file created in `dir` and removed at once; when that fails too, the answer
 * is no, the safe side (setuid bits are dropped).
 */
export async function runningAsRoot(dir: string): Promise<boolean> {
  try {
    return process.getuid?.() === 0;
  } catch {
    const probe = `${dir}/.image-proxy-owner-${crypto.randomUUID()}`;
    try {
      const handle = await open(probe, "wx", 0o600);
      try {
        return (await handle.stat()).uid === 0;
      } finally {
        await handle.close();
        await rm(probe, { force: true });
      }
    } catch {
      return false;
    }
  }
}
