/**
 * Reading an image's layers as tar entries without unpacking them: the layer list with each layer's
 * diff id, and a reader that checks the uncompressed bytes against that diff id while it streams.
 * The merged view, `readFile` and `exportImage` are built on it.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { ImageProxyError } from "../errors.ts";
import type { ImageProxy, OpenedImage } from "../proxy.ts";
import { decompress } from "./decompress.ts";
import { LayerError, UnsafeEntryError } from "./extract.ts";
import { readTar, type TarEntry, type TarEntryType, TarFormatError } from "./tar.ts";

/** The proxy methods the image readers use (an {@linkcode ImageProxy} has them all). */
export type LayerSource = Pick<ImageProxy, "fetchManifest" | "fetchConfig" | "getBlob">;

/** A layer's uncompressed content does not match the configuration's `rootfs.diff_ids` entry. */
export class DiffIdMismatchError extends LayerError {
  /** The layer's position in the manifest, from 0 (the bottom layer). */
  readonly index: number;
  /** The diff id the configuration lists. */
  readonly expected: string;
  /** The digest of the uncompressed bytes received. */
  readonly actual: string;
  /** Creates the error for layer `index` (blob `digest`). */
  constructor(index: number, digest: string, expected: string, actual: string) {
    super(
      `Layer ${index} (${digest}) does not match its diff id: expected "${expected}", got "${actual}"`,
      digest,
    );
    this.name = "DiffIdMismatchError";
    this.index = index;
    this.expected = expected;
    this.actual = actual;
  }
}

/** The symlink hops a path may take before it is a loop, as on Linux. */
export const MAX_SYMLINK_HOPS = 40;

/** The path does not exist in the image (or a component of it is not a directory). */
export class FileNotFoundError extends ImageProxyError {
  /** The path as the caller gave it. */
  readonly path: string;
  /** Creates the error for `path`. */
  constructor(path: string, detail?: string) {
    super(`No such file in the image: "${path}"${detail ? `: ${detail}` : ""}`);
    this.name = "FileNotFoundError";
    this.path = path;
  }
}

/** The path exists but is not a regular file (a directory, a device, a FIFO). */
export class NotAFileError extends ImageProxyError {
  /** The path as the caller gave it. */
  readonly path: string;
  /** What it is instead. */
  readonly type: FileType;
  /** Creates the error for `path`, which is a `type`. */
  constructor(path: string, type: FileType) {
    super(
      type === "dir"
        ? `Cannot read "${path}": it is a directory`
        : `Cannot read "${path}": it is a ${type}, not a regular file`,
    );
    this.name = "NotAFileError";
    this.path = path;
    this.type = type;
  }
}

/** Resolving the path took more than {@linkcode MAX_SYMLINK_HOPS} symlinks (a loop, as Linux's `ELOOP`). */
export class SymlinkLoopError extends ImageProxyError {
  /** The path as the caller gave it. */
  readonly path: string;
  /** Creates the error for `path`. */
  constructor(path: string) {
    super(`Cannot read "${path}": more than ${MAX_SYMLINK_HOPS} symlinks (a loop?)`);
    this.name = "SymlinkLoopError";
    this.path = path;
  }
}

/** One layer of an image, bottom first. */
export interface ImageLayer {
  /** Position in the manifest, from 0 (the bottom layer). */
  index: number;
  /** The blob's digest. */
  digest: string;
  /** The blob's size. */
  size: number;
  /** The uncompressed digest to check, or `undefined` when checking is off. */
  diffId: string | undefined;
}

/** Options every image reader takes. */
export interface ReadLayerOptions {
  /** Check each layer's uncompressed digest against `rootfs.diff_ids` while it streams (default true). */
  verifyDiffIds?: boolean;
  /** Stops reading; the blob streams are cancelled. */
  signal?: AbortSignal;
}

/**
 * The layers of `image`, bottom first, with their diff ids when checking is on.
 *
 * @throws {LayerError} when checking is on and the configuration does not list one diff id per layer.
 */
export async function imageLayers(
  proxy: LayerSource,
  image: OpenedImage,
  options: ReadLayerOptions = {},
): Promise<ImageLayer[]> {
  const { manifest } = await proxy.fetchManifest(image);
  let diffIds: string[] | undefined;
  if (options.verifyDiffIds ?? true) {
    const ids = (await proxy.fetchConfig(image)).rootfs?.diff_ids;
    if (!Array.isArray(ids) || ids.length !== manifest.layers.length) {
      throw new LayerError(
        `Cannot check diff ids: the configuration lists ${Array.isArray(ids) ? ids.length : "no"} ` +
          `diff ids for ${manifest.layers.length} layers`,
      );
    }
    diffIds = ids;
  }
  return manifest.layers.map((l, index) => ({
    index,
    digest: l.digest,
    size: l.size,
    diffId: diffIds?.[index],
  }));
}

function hashName(diffId: string): string {
  const algorithm = diffId.slice(0, diffId.indexOf(":"));
  if (algorithm !== "sha256" && algorithm !== "sha512") {
    throw new LayerError(`Cannot check diff id "${diffId}": unsupported algorithm`);
  }
  return algorithm;
}

/**
 * The tar entries of one layer, fetched through the proxy (verified by it), decompressed by content and,
 * when the layer has a diff id, hashed as they stream: once the archive has been read to its end the
 * digest is compared and a mismatch throws. A caller that must not act on entries of a layer that turns
 * out to be wrong keeps what it learns until the generator finishes.
 *
 * Breaking out of the loop cancels the blob stream.
 *
 * @throws {DiffIdMismatchError} once the layer's end is reached, when its content is not what the
 * configuration says.
 * @throws {LayerError} for an unsupported compression or a malformed archive.
 */
export async function* layerEntries(
  proxy: LayerSource,
  image: OpenedImage,
  layer: ImageLayer,
  options: { signal?: AbortSignal } = {},
): AsyncGenerator<TarEntry> {
  const { signal } = options;
  signal?.throwIfAborted();
  const hash = layer.diffId === undefined ? undefined : createHash(hashName(layer.diffId));
  const blob = await proxy.getBlob(image, layer.digest, layer.size, { signal });
  let tar: ReadableStream<Uint8Array>;
  try {
    tar = (await decompress(blob.stream)).stream;
  } catch (err) {
    if (err instanceof ImageProxyError) throw err;
    throw new LayerError(`Layer ${layer.index} (${layer.digest}): ${(err as Error).message}`, layer.digest, {
      cause: err,
    });
  }
  if (hash !== undefined) {
    tar = tar.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          hash.update(chunk);
          controller.enqueue(chunk);
        },
      }),
    );
  }
  try {
    for await (const entry of readTar(tar)) {
      signal?.throwIfAborted();
      yield entry;
    }
  } catch (err) {
    if (err instanceof ImageProxyError || signal?.aborted) throw err;
    const what = err instanceof TarFormatError ? "is not a valid tar archive" : "cannot be read";
    throw new LayerError(
      `Layer ${layer.index} (${layer.digest}) ${what}: ${(err as Error)?.message ?? err}`,
      layer.digest,
      { cause: err },
    );
  }
  if (hash !== undefined) {
    const actual = `${layer.diffId!.slice(0, layer.diffId!.indexOf(":"))}:${hash.digest("hex")}`;
    if (actual !== layer.diffId) {
      throw new DiffIdMismatchError(layer.index, layer.digest, layer.diffId!, actual);
    }
  }
}

/** The file types of the merged view, in the words `ls --json` prints. */
export type FileType = "file" | "dir" | "symlink" | "hardlink" | "char" | "block" | "fifo";

const FILE_TYPES: Record<TarEntryType, FileType> = {
  file: "file",
  directory: "dir",
  symlink: "symlink",
  hardlink: "hardlink",
  "character-device": "char",
  "block-device": "block",
  fifo: "fifo",
};

/** The view's name for a tar entry type. */
export function fileType(type: TarEntryType): FileType {
  return FILE_TYPES[type];
}

/** The AUFS whiteout prefix the OCI image spec uses. */
export const WHITEOUT = ".wh.";
/** The name of the marker that makes its directory opaque. */
export const OPAQUE = ".wh..wh..opq";

/**
 * The components of an entry name from a layer: `./` and empty components dropped. Absolute names and
 * `..` are refused, as extraction refuses them.
 *
 * @throws {UnsafeEntryError} for an absolute name or one containing `..`.
 */
export function entryParts(name: string, layer?: string): string[] {
  if (name.startsWith("/")) throw new UnsafeEntryError(name, "it is an absolute path", layer);
  const parts = name.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) {
    throw new UnsafeEntryError(name, 'it contains ".." and could escape the root', layer);
  }
  return parts;
}

/**
 * The components of a path a caller asks for, taken relative to the image root: a leading `/` is
 * allowed, and `..` stops at the root, as it does inside a container.
 */
export function rootParts(path: string, base: string[] = []): string[] {
  const out = path.startsWith("/") ? [] : [...base];
  for (const part of path.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") out.pop();
    else out.push(part);
  }
  return out;
}

/**
 * A byte stream pulled from `chunks` one at a time (no read-ahead); cancelling it returns the generator,
 * so its `finally` blocks release what it holds (blob streams, temporary files).
 */
export function streamOf(chunks: AsyncGenerator<Uint8Array>): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { done, value } = await chunks.next();
      if (done) controller.close();
      else controller.enqueue(value);
    },
    async cancel() {
      await chunks.return(undefined);
    },
  }, { highWaterMark: 0 });
}
