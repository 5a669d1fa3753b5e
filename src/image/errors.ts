/**
 * The errors of layer extraction, and what a layer may ask of the machine that extracts it. Layers are
 * untrusted: a few kilobytes of gzip can describe gigabytes of metadata, so every structure the
 * extraction keeps in memory is bounded here, whatever the layer holds.
 *
 * @module
 */

import { ImageProxyError } from "../errors.ts";

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

/** A layer exceeds one of the {@linkcode LAYER_LIMITS}: refused before it could exhaust memory or time. */
export class LayerLimitError extends LayerError {
  /** The limit exceeded: a key of {@linkcode LAYER_LIMITS}. */
  readonly limit: keyof typeof LAYER_LIMITS;
  /** The limit's value. */
  readonly max: number;
  /**
   * Creates the error.
   *
   * @param limit the limit exceeded.
   * @param message what exceeded it; the limit's name and value are appended.
   * @param digest the layer's digest, when known.
   */
  constructor(limit: keyof typeof LAYER_LIMITS, message: string, digest?: string) {
    const max = LAYER_LIMITS[limit];
    super(`${message} (limit "${limit}": ${max})`, digest);
    this.name = "LayerLimitError";
    this.limit = limit;
    this.max = max;
  }
}

/**
 * The bounds every layer is held to. Real images stay far below them: GNU tar, Go's archive/tar and
 * containers/storage write a few hundred bytes of PAX records per entry and at most one global header.
 */
export const LAYER_LIMITS = {
  /** Bytes of one metadata entry: a PAX header, a GNU long name or long link name. */
  metadataBytes: 1 << 20,
  /** Bytes of every global PAX header of a layer together. */
  globalMetadataBytes: 1 << 20,
  /** Bytes (UTF-8) of an entry name or a link target, Linux's `PATH_MAX`. */
  pathBytes: 4096,
  /** Components of an entry name or a hardlink target. */
  pathComponents: 1024,
  /** Names of skipped entries (devices, FIFOs) kept in a layer's stats; the rest are only counted. */
  skippedNames: 20,
  /** Bytes of a sparse file's map of data segments (GNU format 1.0: about 16 bytes per segment). */
  sparseMapBytes: 1 << 20,
  /** Bytes of one entry's extended attributes (PAX `SCHILY.xattr.*` records, names and values). */
  xattrBytes: 1 << 16,
  /** The largest chunk decompression hands on, in bytes. */
  chunkBytes: 1 << 20,
  /** The largest zstd window accepted (zstd's own default limit, `--memory=128MB`). */
  zstdWindowBytes: 1 << 27,
} as const;

/** The archive is malformed or uses a feature a layer must not (old GNU sparse formats, multi-volume). */
export class TarFormatError extends Error {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "TarFormatError";
  }
}

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

/** `extractImage` was asked to write into a directory that already holds files. */
export class DirectoryNotEmptyError extends ImageProxyError {
  /** The directory. */
  readonly path: string;
  /** Creates the error for `path`. */
  constructor(path: string) {
    super(
      `Refusing to extract into "${path}": the directory is not empty (pass "overwrite" to extract over ` +
        "what it holds)",
    );
    this.name = "DirectoryNotEmptyError";
    this.path = path;
  }
}
