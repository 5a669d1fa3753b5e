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
 * Owners: run as root, the extraction keeps each entry's numeric uid and gid (`lchown`, never a name
 * looked up on the host), as GNU tar and umoci do; otherwise, or with `sameOwner: false`, files belong
 * to whoever runs it and setuid and setgid bits are dropped, so that an untrusted layer never leaves
 * a setuid program owned by someone it did not name. Device nodes and FIFOs are skipped and counted
 * in the result (the first few by name), since they cannot be created without `mknod`. Sparse files
 * (GNU tar's PAX format 1.0) keep their holes: only their data is written, at its offsets.
 *
 * Memory stays bounded whatever a layer holds ({@linkcode LAYER_LIMITS}); a layer over a limit fails
 * with a {@linkcode LayerLimitError} naming it.
 *
 * @module
 * @tags allow-read, allow-write
 */

import { createHash } from "node:crypto";
import { lchown } from "node:fs/promises";
import { ImageProxyError } from "../errors.ts";
import { type Compression, decompress } from "./decompress.ts";
import type { ImageProxy, OpenedImage } from "../proxy.ts";
import { readTar, TarFormatError } from "./tar.ts";
import { DirectoryNotEmptyError, LayerError, LayerLimitError, UnsafeEntryError } from "./errors.ts";
import { WrittenPaths } from "./paths.ts";
import { applyEntry, type LayerStats, pruneLower } from "./entry.ts";
import { EntryMetadata } from "./metadata.ts";
import {
  applyDirectoryModes,
  components,
  type DirectoryModes,
  readdirOrEmpty,
  removeWritten,
  runningAsRoot,
  Target,
  unsafe,
} from "./target.ts";
export type { Compression } from "./decompress.ts";
export {
  DirectoryNotEmptyError,
  LAYER_LIMITS,
  LayerError,
  LayerLimitError,
  UnsafeEntryError,
} from "./errors.ts";
export { type WrittenNode, WrittenPaths } from "./paths.ts";
export type { LayerStats } from "./entry.ts";
export { applyDirectoryModes, type DirectoryModes } from "./target.ts";

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
  /**
   * What earlier layers of the same image wrote (one object for all the image's layers; this layer's
   * paths are added to it). When given, whiteouts and opaque directories remove only those paths,
   * never what `dir` held before the image; without it they remove whatever `dir` holds there.
   */
  writtenPaths?: WrittenPaths;
  /**
   * Keep each entry's numeric owner and group (`lchown`). Default: when running as root. When owners
   * are not kept, setuid and setgid bits are dropped.
   */
  sameOwner?: boolean;
  /**
   * Apply the layer's root entry (`./`) to `dir` itself: its mode, its owner (with `sameOwner`) and its
   * time, as GNU tar does. Default: when `dir` is missing or empty as the call begins, so that a layer
   * applied over a directory that holds other things never changes it. Pass `true` for every layer of
   * an image that started in an empty directory (what {@linkcode extractImage} does).
   */
  rootEntry?: boolean;
  /** Write the entries' extended attributes (PAX `SCHILY.xattr.*`; default true). */
  xattrs?: boolean;
}

/**
 * Applies one layer to `dir`: `stream` is the layer blob as stored (gzip, zstd or uncompressed tar;
 * the content decides). Whiteouts remove what lower layers put there (only what earlier layers of the
 * image wrote, when `writtenPaths` is given). The stream is read to its end even after the tar's end
 * marker, so a verifying blob stream always gets to its verdict.
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
 * @throws {LayerError} for a malformed layer or a wrong diff id; {@linkcode LayerLimitError} for a
 * layer over one of the {@linkcode LAYER_LIMITS}.
 */
export async function applyLayer(
  stream: ReadableStream<Uint8Array>,
  dir: string,
  options: ApplyLayerOptions = {},
): Promise<LayerStats> {
  const { signal } = options;
  signal?.throwIfAborted();
  const rootEntry = options.rootEntry ?? (await readdirOrEmpty(dir)).length === 0;
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
    skippedCount: 0,
    xattrs: 0,
    xattrsSkipped: 0,
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
  // Whiteouts only remove what lower layers put there: the paths this layer wrote are recorded (by
  // real path, so that a symlinked parent cannot hide them), and with the image's record, so are
  // the earlier layers', which are then the only ones a whiteout may remove.
  const imageScoped = options.writtenPaths !== undefined;
  const written = options.writtenPaths ?? new WrittenPaths();
  const layer = written.nextLayer();
  const asRoot = await runningAsRoot(target.root);
  const sameOwner = options.sameOwner ?? asRoot;
  const metadata = await EntryMetadata.open({ xattrs: options.xattrs ?? true, asRoot });
  const opaque = new Map<string, string[]>();

  try {
    for await (const entry of readTar(tarStream)) {
      signal?.throwIfAborted();
      stats.entries++;
      const header = entry.header;
      const parts = components(header.name);
      if (parts.length === 0) {
        if (header.type !== "directory") throw unsafe(header.name, "it names the target directory itself");
        if (rootEntry) {
          if (sameOwner) await lchown(target.root, header.uid, header.gid);
          metadata.xattrs(target.root, header, stats);
          directoryModes.set(target.root, {
            mode: sameOwner ? header.mode : header.mode & ~0o6000,
            mtime: header.mtime,
            mtimeNs: header.mtimeNs,
          });
        }
        continue;
      }
      const base = parts[parts.length - 1];
      const parentParts = parts.slice(0, -1);
      if (base.startsWith(".wh.")) {
        stats.whiteouts++;
        if (base.startsWith(".wh..wh.") && base !== ".wh..wh..opq") continue; // Other AUFS metadata.
        const victim = base.slice(4);
        if (victim === "" || victim === "." || victim === "..") {
          throw unsafe(header.name, `it is a whiteout for "${victim}", which is not a file name`);
        }
        const parent = await target.directory(header.name, parentParts, false);
        if (parent === null) continue; // Nothing below a missing directory to hide.
        const realParts = target.relative(parent);
        if (base === ".wh..wh..opq") {
          opaque.set(parent, realParts);
          written.mark(realParts);
          continue;
        }
        const victimParts = [...realParts, victim];
        const node = written.get(victimParts);
        if (node?.layer === layer) continue; // Whiteouts hide lower layers only.
        if (imageScoped && node === undefined) continue; // Not the image's: it was there before.
        await removeWritten(`${parent}/${victim}`, imageScoped ? node : undefined);
        written.delete(victimParts);
        target.forget();
        continue;
      }
      const parent = await applyEntry(
        target,
        entry,
        parts,
        stats,
        directoryModes,
        sameOwner,
        metadata,
      );
      if (parent !== null) written.mark([...target.relative(parent), base]);
    }
    for (const [real, parts] of opaque) {
      await pruneLower(real, written.get(parts), layer, imageScoped);
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
  if (ownModes) await applyDirectoryModes(directoryModes, metadata);
  return stats;
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
  /**
   * Extract into a directory that already holds files. Without it a non-empty `dir` is refused with
   * a {@linkcode DirectoryNotEmptyError}. With it, the image's entries replace what is at their
   * paths, and whiteouts remove only what earlier layers of the image wrote: the rest stays.
   */
  overwrite?: boolean;
  /** Keep each entry's numeric owner and group; see {@linkcode ApplyLayerOptions.sameOwner}. */
  sameOwner?: boolean;
  /** Write the entries' extended attributes (default true); see {@linkcode ApplyLayerOptions.xattrs}. */
  xattrs?: boolean;
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
 * Unpacks the filesystem of `image` into `dir` (created if missing, and refused when it holds files
 * unless `overwrite` is set): every layer, in order, streamed from the proxy and verified by it, with
 * OCI whiteouts applied. Run as root it keeps the layers' numeric owners; see the module docs. When
 * it fails, `dir` holds whatever was applied so far and should be discarded.
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
 * @throws {DirectoryNotEmptyError} when `dir` holds files and `overwrite` is not set.
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
  // The layers' root entries apply to `dir` only when it holds nothing of anyone else's.
  const empty = (await readdirOrEmpty(dir)).length === 0;
  if (!options.overwrite && !empty) throw new DirectoryNotEmptyError(dir);
  const { digest, manifest } = await proxy.fetchManifest(image);
  let diffIds: string[] | undefined;
  if (options.verifyDiffIds ?? true) {
    const ids = (await proxy.fetchConfig(image)).rootfs?.diff_ids;
    if (Array.isArray(ids) && ids.length === manifest.layers.length) diffIds = ids;
  }
  const totalBytes = manifest.layers.reduce((n, l) => n + l.size, 0);
  const directoryModes: DirectoryModes = new Map();
  const writtenPaths = new WrittenPaths();
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
      stats = await applyLayer(counted, dir, {
        diffId: diffIds?.[i],
        signal,
        directoryModes,
        writtenPaths,
        sameOwner: options.sameOwner,
        rootEntry: empty,
        xattrs: options.xattrs,
      });
    } catch (err) {
      if (err instanceof LayerLimitError && err.digest === undefined) {
        throw new LayerLimitError(err.limit, `Layer ${layer.digest}: ${err.message}`, layer.digest);
      }
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
