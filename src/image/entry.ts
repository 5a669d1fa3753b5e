/**
 * One layer entry applied to the target directory (files, directories, links; devices and FIFOs
 * counted), and the pruning of an opaque directory: the steps `applyLayer` takes per entry.
 *
 * @module
 */

import { chmod, lchown, link, mkdir, open, readdir, symlink } from "node:fs/promises";
import { LAYER_LIMITS, LayerError } from "./errors.ts";
import type { Compression } from "./decompress.ts";
import type { EntryMetadata } from "./metadata.ts";
import type { WrittenNode } from "./paths.ts";
import type { TarEntry } from "./tar.ts";
import {
  components,
  type DirectoryModes,
  lstatOrNull,
  remove,
  removeWritten,
  type Target,
  unsafe,
  writeAll,
} from "./target.ts";

/** What applying one layer did. */
export interface LayerStats {
  /** The compression found in the layer's first bytes. */
  compression: Compression;
  /** Tar entries read. */
  entries: number;
  /** Regular files written. */
  files: number;
  /** Directories created or updated. */
  directories: number;
  /** Symlinks created. */
  symlinks: number;
  /** Hardlinks created. */
  hardlinks: number;
  /** Whiteouts applied (`.wh.NAME` and opaque markers). */
  whiteouts: number;
  /** File content bytes written. */
  bytes: number;
  /** The first entries not created (device nodes, FIFOs), as `TYPE NAME` (`LAYER_LIMITS.skippedNames`). */
  skipped: string[];
  /** How many entries were not created, named in `skipped` or not. */
  skippedCount: number;
  /** Extended attributes written. */
  xattrs: number;
  /**
   * Extended attributes not written: `xattrs: false`, a namespace not written (`system.*`; `trusted.*`
   * and `security.*` but the capability when not root), refused by the file system, or a runtime
   * that cannot write them (Deno without `--allow-ffi`).
   */
  xattrsSkipped: number;
}

/**
 * Removes what lower layers put under `real` (an opaque directory): everything this layer did not
 * write, or with `imageScoped`, only what earlier layers of the image wrote.
 */
export async function pruneLower(
  real: string,
  node: WrittenNode | undefined,
  layer: number,
  imageScoped: boolean,
): Promise<void> {
  for (const name of await readdir(real)) {
    const child = node?.children?.get(name);
    const path = `${real}/${name}`;
    if (child?.layer === layer) {
      if ((await lstatOrNull(path))?.isDirectory()) await pruneLower(path, child, layer, imageScoped);
      continue;
    }
    if (imageScoped && child === undefined) continue;
    await removeWritten(path, imageScoped ? child : undefined);
    node?.children?.delete(name);
  }
}

/** Creates one entry; returns the real path of its parent, or `null` when it was skipped. */
export async function applyEntry(
  target: Target,
  entry: TarEntry,
  parts: string[],
  stats: LayerStats,
  directoryModes: DirectoryModes,
  sameOwner: boolean,
  metadata: EntryMetadata,
): Promise<string | null> {
  const header = entry.header;
  const name = header.name;
  if (header.type === "character-device" || header.type === "block-device" || header.type === "fifo") {
    if (stats.skipped.length < LAYER_LIMITS.skippedNames) stats.skipped.push(`${header.type} ${name}`);
    stats.skippedCount++;
    return null;
  }
  // Check a hardlink's target before anything is created for the entry.
  let linkTarget: string | undefined;
  if (header.type === "hardlink") {
    const targetParts = components(header.linkname, name, `its hardlink target "${header.linkname}"`);
    if (targetParts.length === 0) throw unsafe(name, "its hardlink target is the target directory");
    const parent = await target.directory(name, targetParts.slice(0, -1), false);
    const path = parent === null ? null : `${parent}/${targetParts[targetParts.length - 1]}`;
    const info = path === null ? null : await lstatOrNull(path);
    if (path === null || info === null) {
      throw new LayerError(
        `Cannot create hardlink "${name}": its target "${header.linkname}" does not exist`,
      );
    }
    if (info.isDirectory()) throw unsafe(name, `its hardlink target "${header.linkname}" is a directory`);
    linkTarget = path;
  }
  const parent = (await target.directory(name, parts.slice(0, -1), true))!;
  const path = `${parent}/${parts[parts.length - 1]}`;
  const existing = await lstatOrNull(path);
  // Without the layer's owners, a setuid or setgid bit would grant the extracting user's rights.
  const mode = sameOwner ? header.mode : header.mode & ~0o6000;
  const chown = () => sameOwner ? lchown(path, header.uid, header.gid) : Promise.resolve();

  if (header.type === "directory") {
    if (existing !== null && !existing.isDirectory()) {
      await remove(path);
      target.forget();
    }
    if (existing === null || !existing.isDirectory()) await mkdir(path, { mode: 0o755 });
    await chown();
    metadata.xattrs(path, header, stats);
    stats.directories++;
    directoryModes.set(path, { mode, mtime: header.mtime, mtimeNs: header.mtimeNs });
    return parent;
  }
  if (existing !== null) {
    if (linkTarget === path) return parent; // A hardlink to itself.
    await remove(path);
    target.forget();
  }
  switch (header.type) {
    case "file": {
      // "wx" is O_CREAT|O_EXCL: it never follows a symlink, and the path was just cleared.
      const handle = await open(path, "wx", 0o600);
      try {
        if (header.sparse === undefined) {
          for await (const chunk of entry.content()) {
            await writeAll(handle, chunk);
            stats.bytes += chunk.length;
          }
        } else {
          // Only the data is written, each segment at its offset: the holes stay holes, as GNU tar
          // leaves them, and the size is set last (a file may end in a hole).
          for await (const { offset, data } of entry.segments()) {
            await writeAll(handle, data, offset);
            stats.bytes += data.length;
          }
          await handle.truncate(header.size);
        }
      } finally {
        await handle.close();
      }
      // Owner, mode, attributes, time: changing the owner clears setuid, setgid and a capability.
      await chown();
      await chmod(path, mode);
      metadata.xattrs(path, header, stats);
      await metadata.times(path, header);
      stats.files++;
      return parent;
    }
    case "symlink":
      await symlink(header.linkname, path);
      await chown();
      metadata.xattrs(path, header, stats);
      await metadata.times(path, header, true);
      target.forget();
      stats.symlinks++;
      return parent;
    case "hardlink":
      await link(linkTarget!, path);
      stats.hardlinks++;
      return parent;
  }
  return null;
}
