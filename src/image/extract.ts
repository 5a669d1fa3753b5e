/**
 * Unpacks an image's filesystem into a directory: each layer streamed from the proxy, decompressed by
 * content (gzip, zstd or none), read as tar and applied in order with OCI whiteouts.
 *
 * Layers are untrusted input. Every entry name is checked (no absolute names, no `..`); every parent
 * directory is resolved on disk and must stay inside the target, so a symlink planted by an earlier
 * entry cannot redirect a later one; an existing symlink at an entry's own path is replaced, never
 * written through; hardlink targets must name an existing non-directory inside the target. Anything
 * else is refused with an {@linkcode UnsafeEntryError} naming the entry.
 *
 * Ownership is not applied (the files belong to whoever runs the extraction); device nodes and FIFOs
 * are skipped and listed in the result, since they cannot be created without `mknod`.
 *
 * @module
 * @tags allow-read, allow-write
 */

import { createHash } from "node:crypto";
import {
  chmod,
  link,
  lstat,
  mkdir,
  open,
  readdir,
  realpath,
  rm,
  stat,
  symlink,
  utimes,
} from "node:fs/promises";
import { ImageProxyError } from "../errors.ts";
import { type Compression, decompress } from "./decompress.ts";
export type { Compression } from "./decompress.ts";
import type { ImageProxy, OpenedImage } from "../proxy.ts";
import { readTar, TarFormatError, type TarHeader } from "./tar.ts";

/** A layer entry that would escape or misuse the target directory; nothing of it was written. */
export class UnsafeEntryError extends ImageProxyError {
  /** The entry's name as stored in the layer. */
  readonly entry: string;
  /** Why it was refused. */
  readonly reason: string;
  /** The digest of the layer it came from, when known. */
  readonly layer: string | undefined;
  /** Creates the error for `entry` (of `layer`, if known), explaining `reason`. */
  constructor(entry: string, reason: string, layer?: string) {
    super(`Refusing layer entry "${entry}"${layer ? ` of layer ${layer}` : ""}: ${reason}`);
    this.name = "UnsafeEntryError";
    this.entry = entry;
    this.reason = reason;
    this.layer = layer;
  }
}

/** A layer could not be applied: malformed tar, unsupported compression, wrong uncompressed digest. */
export class LayerError extends ImageProxyError {
  /** The layer's digest, when known. */
  readonly digest: string | undefined;
  /** Creates the error. */
  constructor(message: string, digest?: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "LayerError";
    this.digest = digest;
  }
}

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
  /** Entries not created (device nodes, FIFOs), as `TYPE NAME`. */
  skipped: string[];
}

/** Options for {@linkcode applyLayer}. */
export interface ApplyLayerOptions {
  /** The layer's uncompressed digest (`rootfs.diff_ids[i]`): when given, a mismatch fails the layer. */
  diffId?: string;
  /** Stops the extraction; the stream is cancelled. */
  signal?: AbortSignal;
  /**
   * Directory modes are applied last, so that a read-only directory can still be filled. By default
   * at the end of this layer; pass one map to several calls to apply them together with
   * {@linkcode applyDirectoryModes} at the very end (what {@linkcode extractImage} does).
   */
  directoryModes?: DirectoryModes;
}

/** Directory modes and times waiting to be applied, by real path. */
export type DirectoryModes = Map<string, { mode: number; mtime: number }>;

function unsafe(name: string, reason: string): UnsafeEntryError {
  return new UnsafeEntryError(name, reason);
}

/**
 * Splits a path from the archive into components, refusing absolute paths and `..`.
 *
 * @param path an entry name or a hardlink target.
 * @param entry the entry to name in the error.
 * @param what how the message refers to `path`.
 */
function components(path: string, entry = path, what = "it"): string[] {
  if (path.startsWith("/")) throw unsafe(entry, `${what} is an absolute path`);
  const parts = path.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) {
    throw unsafe(entry, `${what} contains ".." and could escape the target directory`);
  }
  return parts;
}

function isMissing(err: unknown): boolean {
  const code = (err as { code?: string })?.code;
  return code === "ENOENT" || code === "ENOTDIR";
}

async function lstatOrNull(path: string) {
  try {
    return await lstat(path);
  } catch (err) {
    if (isMissing(err)) return null;
    throw err;
  }
}

/** Resolves paths inside one target directory, on disk, never leaving it. */
class Target {
  readonly root: string;
  /** Relative directory path -> real path, for directories already resolved in this layer. */
  #resolved = new Map<string, string>();

  constructor(root: string) {
    this.root = root;
  }

  static async open(dir: string): Promise<Target> {
    await mkdir(dir, { recursive: true });
    return new Target(await realpath(dir));
  }

  inside(real: string): boolean {
    return real === this.root || real.startsWith(this.root.endsWith("/") ? this.root : `${this.root}/`);
  }

  forget(): void {
    this.#resolved.clear();
  }

  /**
   * The real path of the directory `parts` names, each step checked: a symlink is followed only when
   * it leads to a directory inside the target. With `create`, missing directories are made (0755);
   * without, a missing one yields `null`.
   */
  async directory(entry: string, parts: string[], create: boolean): Promise<string | null> {
    let current = this.root;
    for (let i = 0; i < parts.length; i++) {
      const key = parts.slice(0, i + 1).join("/");
      const known = this.#resolved.get(key);
      if (known !== undefined) {
        current = known;
        continue;
      }
      const path = `${current}/${parts[i]}`;
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
          throw unsafe(entry, `its parent "${key}" is a symlink that does not resolve`);
        }
        if (!this.inside(real)) {
          throw unsafe(entry, `its parent "${key}" is a symlink pointing outside the target directory`);
        }
        if (!(await stat(real)).isDirectory()) {
          throw unsafe(entry, `its parent "${key}" is a symlink to something that is not a directory`);
        }
        current = real;
      } else if (info.isDirectory()) {
        current = path;
      } else {
        throw new LayerError(`Cannot create layer entry "${entry}": "${key}" is not a directory`);
      }
      this.#resolved.set(key, current);
    }
    return current;
  }
}

/** Removes whatever is at `path` (never following a symlink). */
async function remove(path: string): Promise<void> {
  await rm(path, { recursive: true, force: true });
}

async function writeAll(
  handle: Awaited<ReturnType<typeof open>>,
  chunk: Uint8Array,
): Promise<void> {
  let offset = 0;
  while (offset < chunk.length) {
    const { bytesWritten } = await handle.write(chunk, offset, chunk.length - offset);
    offset += bytesWritten;
  }
}

/** Applies every pending directory mode and time, deepest first. */
export async function applyDirectoryModes(modes: DirectoryModes): Promise<void> {
  const paths = [...modes.keys()].sort((a, b) => b.length - a.length);
  for (const path of paths) {
    const { mode, mtime } = modes.get(path)!;
    try {
      // A later entry may have replaced the directory, or one of its parents, with a symlink: chmod
      // and utimes follow symlinks, so only a path that is still exactly this directory is touched.
      if ((await realpath(path)) !== path || !(await lstat(path)).isDirectory()) continue;
      await chmod(path, mode);
      await utimes(path, mtime, mtime);
    } catch (err) {
      if (!isMissing(err)) throw err;
    }
  }
  modes.clear();
}

/**
 * Applies one layer to `dir`: `stream` is the layer blob as stored (gzip, zstd or uncompressed tar;
 * the content decides). Whiteouts remove what lower layers put there. The stream is read to its end
 * even after the tar's end marker, so a verifying blob stream always gets to its verdict.
 *
 * @example Applying a layer from a file
 * ```ts ignore
 * import { applyLayer } from "./extract.ts";
 * const file = await Deno.open("layer.tar.gz");
 * const stats = await applyLayer(file.readable, "./rootfs");
 * console.log(stats.files, "files");
 * ```
 *
 * @throws {UnsafeEntryError} for an entry that would escape `dir`.
 * @throws {LayerError} for a malformed layer or a wrong diff id.
 */
export async function applyLayer(
  stream: ReadableStream<Uint8Array>,
  dir: string,
  options: ApplyLayerOptions = {},
): Promise<LayerStats> {
  const { signal } = options;
  signal?.throwIfAborted();
  const target = await Target.open(dir);
  let decompressed: { compression: Compression; stream: ReadableStream<Uint8Array> };
  try {
    decompressed = await decompress(stream);
  } catch (err) {
    if (err instanceof ImageProxyError) throw err;
    throw new LayerError((err as Error).message ?? String(err), undefined, { cause: err });
  }
  const stats: LayerStats = {
    compression: decompressed.compression,
    entries: 0,
    files: 0,
    directories: 0,
    symlinks: 0,
    hardlinks: 0,
    whiteouts: 0,
    bytes: 0,
    skipped: [],
  };
  let tarStream = decompressed.stream;
  let hash: ReturnType<typeof createHash> | undefined;
  if (options.diffId !== undefined) {
    const algorithm = options.diffId.slice(0, options.diffId.indexOf(":"));
    hash = createHash(algorithm === "sha512" ? "sha512" : "sha256");
    const h = hash;
    tarStream = tarStream.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          h.update(chunk);
          controller.enqueue(chunk);
        },
      }),
    );
  }
  const ownModes = options.directoryModes === undefined;
  const directoryModes: DirectoryModes = options.directoryModes ?? new Map();
  // Paths this layer wrote (with their ancestors): whiteouts only remove what lower layers put there.
  const written = new Set<string>();
  const markWritten = (parts: string[]) => {
    for (let i = 1; i <= parts.length; i++) written.add(parts.slice(0, i).join("/"));
  };
  const opaque: string[][] = [];

  try {
    for await (const entry of readTar(tarStream)) {
      signal?.throwIfAborted();
      stats.entries++;
      const header = entry.header;
      const parts = components(header.name);
      if (parts.length === 0) {
        if (header.type === "directory") continue; // The root itself ("./").
        throw unsafe(header.name, "it names the target directory itself");
      }
      const base = parts[parts.length - 1];
      const parentParts = parts.slice(0, -1);
      if (base.startsWith(".wh.")) {
        stats.whiteouts++;
        if (base === ".wh..wh..opq") {
          opaque.push(parentParts);
          markWritten(parentParts);
          continue;
        }
        if (base.startsWith(".wh..wh.")) continue; // Other AUFS metadata: nothing to do.
        const victim = base.slice(4);
        if (victim === "" || victim === "." || victim === "..") {
          throw unsafe(header.name, `it is a whiteout for "${victim}", which is not a file name`);
        }
        const victimParts = [...parentParts, victim];
        if (written.has(victimParts.join("/"))) continue; // Whiteouts hide lower layers only.
        const parent = await target.directory(header.name, parentParts, false);
        if (parent !== null) {
          await remove(`${parent}/${victim}`);
          target.forget();
        }
        continue;
      }
      markWritten(parts);
      await applyEntry(target, header, parts, entry.content(), stats, directoryModes);
    }
    for (const parts of opaque) {
      const real = await target.directory(parts.join("/") || ".", parts, false);
      if (real !== null) await pruneLower(real, parts.join("/"), written);
    }
  } catch (err) {
    await tarStream.cancel(err).catch(() => {});
    if (err instanceof ImageProxyError || signal?.aborted) throw err;
    if (err instanceof TarFormatError) {
      throw new LayerError(`Layer is not a valid tar archive: ${err.message}`, undefined, {
        cause: err,
      });
    }
    // Decompression and file system failures: keep their message, say where it happened.
    throw new LayerError(`Cannot apply layer: ${(err as Error)?.message ?? err}`, undefined, { cause: err });
  }
  if (hash !== undefined) {
    const actual = `${options.diffId!.slice(0, options.diffId!.indexOf(":"))}:${hash.digest("hex")}`;
    if (actual !== options.diffId) {
      throw new LayerError(
        `Layer content does not match its diff id: expected ${options.diffId}, got ${actual}`,
      );
    }
  }
  if (ownModes) await applyDirectoryModes(directoryModes);
  return stats;
}

/** Removes everything under `real` that this layer did not write (an opaque directory). */
async function pruneLower(real: string, relative: string, written: Set<string>): Promise<void> {
  for (const name of await readdir(real)) {
    const rel = relative ? `${relative}/${name}` : name;
    const path = `${real}/${name}`;
    if (!written.has(rel)) {
      await remove(path);
      continue;
    }
    const info = await lstatOrNull(path);
    if (info?.isDirectory()) await pruneLower(path, rel, written);
  }
}

async function applyEntry(
  target: Target,
  header: TarHeader,
  parts: string[],
  content: AsyncIterable<Uint8Array>,
  stats: LayerStats,
  directoryModes: DirectoryModes,
): Promise<void> {
  const name = header.name;
  if (header.type === "character-device" || header.type === "block-device" || header.type === "fifo") {
    stats.skipped.push(`${header.type} ${name}`);
    return;
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
  const parent = await target.directory(name, parts.slice(0, -1), true);
  const path = `${parent}/${parts[parts.length - 1]}`;
  const existing = await lstatOrNull(path);
  const mtime = Number.isFinite(header.mtime) ? header.mtime : 0;

  if (header.type === "directory") {
    if (existing !== null && !existing.isDirectory()) {
      await remove(path);
      target.forget();
    }
    if (existing === null || !existing.isDirectory()) await mkdir(path, { mode: 0o755 });
    stats.directories++;
    directoryModes.set(path, { mode: header.mode, mtime });
    return;
  }
  if (existing !== null) {
    if (linkTarget === path) return; // A hardlink to itself.
    await remove(path);
    target.forget();
  }
  switch (header.type) {
    case "file": {
      // "wx" is O_CREAT|O_EXCL: it never follows a symlink, and the path was just cleared.
      const handle = await open(path, "wx", 0o600);
      try {
        for await (const chunk of content) {
          await writeAll(handle, chunk);
          stats.bytes += chunk.length;
        }
      } finally {
        await handle.close();
      }
      await chmod(path, header.mode);
      await utimes(path, mtime, mtime);
      stats.files++;
      return;
    }
    case "symlink":
      await symlink(header.linkname, path);
      target.forget();
      stats.symlinks++;
      return;
    case "hardlink":
      await link(linkTarget!, path);
      stats.hardlinks++;
      return;
  }
}

/** Progress of {@linkcode extractImage} (and of the CLI's fetch). */
export interface LayerProgress {
  /** The layer being read, from 1. */
  layer: number;
  /** How many layers the image has. */
  layers: number;
  /** Bytes of this layer's blob read so far. */
  layerBytes: number;
  /** The layer blob's size. */
  layerSize: number;
  /** Blob bytes read so far over all layers. */
  bytes: number;
  /** The size of all layer blobs together. */
  totalBytes: number;
}

/** Options for {@linkcode extractImage}. */
export interface ExtractOptions {
  /** Stops the extraction. */
  signal?: AbortSignal;
  /** Called as bytes arrive (often: throttle any display). */
  onProgress?: (progress: LayerProgress) => void;
  /** Check each layer's uncompressed digest against the configuration's `rootfs.diff_ids` (default true). */
  verifyDiffIds?: boolean;
}

/** What {@linkcode extractImage} did. */
export interface ExtractResult {
  /** The manifest digest the proxy reported. */
  digest: string;
  /** One entry per layer, in order. */
  layers: (LayerStats & { digest: string; size: number })[];
}

/**
 * Counts bytes through a stream, for progress.
 *
 * @param onBytes called with the size of each chunk as it passes.
 */
export function countingStream(
  stream: ReadableStream<Uint8Array>,
  onBytes: (count: number) => void,
): ReadableStream<Uint8Array> {
  return stream.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        onBytes(chunk.length);
        controller.enqueue(chunk);
      },
    }),
  );
}

/**
 * Unpacks the filesystem of `image` into `dir` (created if missing): every layer, in order, streamed
 * from the proxy and verified by it, with OCI whiteouts applied. When it fails, `dir` holds whatever
 * was applied so far and should be discarded.
 *
 * @example Extracting an image
 * ```ts ignore
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { extractImage } from "jsr:@cip/containers-image-proxy/extract";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * const { layers } = await extractImage(proxy, img, "./rootfs");
 * console.log(layers.length, "layers applied");
 * ```
 *
 * @throws {UnsafeEntryError} for a hostile entry; {@linkcode LayerError}, `BlobError` and the proxy's
 * errors otherwise.
 */
export async function extractImage(
  proxy: ImageProxy,
  image: OpenedImage,
  dir: string,
  options: ExtractOptions = {},
): Promise<ExtractResult> {
  const { signal, onProgress } = options;
  const { digest, manifest } = await proxy.fetchManifest(image);
  let diffIds: string[] | undefined;
  if (options.verifyDiffIds ?? true) {
    const ids = (await proxy.fetchConfig(image)).rootfs?.diff_ids;
    if (Array.isArray(ids) && ids.length === manifest.layers.length) diffIds = ids;
  }
  const totalBytes = manifest.layers.reduce((n, l) => n + l.size, 0);
  const directoryModes: DirectoryModes = new Map();
  const layers: ExtractResult["layers"] = [];
  let bytes = 0;
  for (const [i, layer] of manifest.layers.entries()) {
    signal?.throwIfAborted();
    const blob = await proxy.getDescriptor(image, layer, { signal });
    let layerBytes = 0;
    const report = () =>
      onProgress?.({
        layer: i + 1,
        layers: manifest.layers.length,
        layerBytes,
        layerSize: layer.size,
        bytes,
        totalBytes,
      });
    report();
    const counted = countingStream(blob.stream, (n) => {
      layerBytes += n;
      bytes += n;
      report();
    });
    let stats: LayerStats;
    try {
      stats = await applyLayer(counted, dir, { diffId: diffIds?.[i], signal, directoryModes });
    } catch (err) {
      if (err instanceof LayerError && err.digest === undefined) {
        throw new LayerError(`Layer ${layer.digest}: ${err.message}`, layer.digest, { cause: err });
      }
      if (err instanceof UnsafeEntryError) {
        throw new UnsafeEntryError(err.entry, err.reason, layer.digest);
      }
      throw err;
    }
    layers.push({ digest: layer.digest, size: layer.size, ...stats });
  }
  await applyDirectoryModes(directoryModes);
  return { digest, layers };
}
