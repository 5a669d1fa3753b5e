/**
 * An opt-in blob cache on disk, shared by every process that names the same directory. It is laid out
 * as an OCI image layout's `blobs/` folder (`DIR/blobs/sha256/<hex>`), holds only bytes the proxy
 * verified, and is checked again when read.
 *
 * - A blob is written under a temporary name while it streams from the proxy and renamed into place only
 *   once the proxy's stream closed normally (size and digest confirmed). A reader that stops early, or a
 *   stream that errors, leaves nothing behind. Renaming is atomic, so processes filling the same cache at
 *   once never see a partial blob; two copies of one blob simply replace each other.
 * - A hit is hashed as it is read: a cached file whose bytes no longer match its name errors the stream
 *   with a `BlobError` and is removed, so the next read fetches it again.
 * - Eviction is least recently used, by modification time (a hit touches it), after each insertion,
 *   until the blobs fit `maxBytes`. Another process may be reading an evicted blob: its open file stays
 *   readable.
 *
 * Every way the proxy hands out a blob goes through it: `getBlob` (and `getDescriptor`, which calls
 * it), `getRawBlob` (verified by this client: its stream closes normally only once size and digest
 * matched) and `saveBlob` (a hit is copied into the caller's file and checked on the way; a miss is
 * saved by the proxy, then copied into the cache under a temporary name and renamed).
 *
 * @module
 * @tags allow-read, allow-write
 */

import { createHash } from "node:crypto";
import { copyFile, mkdir, open, readdir, rename, rm, stat, utimes } from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import { BlobError } from "../errors.ts";
import type {
  BlobOptions,
  BlobReader,
  ImageProxy,
  OpenedImage,
  RawBlobOptions,
  SaveBlobOptions,
} from "../proxy.ts";
import { digestProblem } from "../reference.ts";

/** Options for {@linkcode BlobCache}. */
export interface BlobCacheOptions {
  /** The most bytes the cached blobs may take together (default 10 GiB). */
  maxBytes?: number;
}

/** The default {@linkcode BlobCacheOptions.maxBytes}: 10 GiB. */
export const DEFAULT_CACHE_BYTES = 10 * 2 ** 30;

const TEMPORARY = ".tmp-";

/** A blob cache in one directory (see the module documentation). */
export class BlobCache {
  /** The cache's directory. */
  readonly dir: string;
  /** The size limit, in bytes. */
  readonly maxBytes: number;

  /** Creates a cache in `dir` (created on first write). */
  constructor(dir: string, options: BlobCacheOptions = {}) {
    this.dir = dir;
    this.maxBytes = options.maxBytes ?? DEFAULT_CACHE_BYTES;
  }

  /** Where the blob `digest` is kept. */
  path(digest: string): string {
    const problem = digestProblem(digest);
    if (problem) throw new BlobError(`Cannot cache blob "${digest}": ${problem}`, digest, false);
    const colon = digest.indexOf(":");
    return join(this.dir, "blobs", digest.slice(0, colon), digest.slice(colon + 1));
  }

  /**
   * The blob `digest` of `size` bytes: from the cache when it is there, else from `proxy` (written to
   * the cache as it streams).
   */
  async getBlob(
    proxy: Pick<ImageProxy, "getBlob">,
    image: OpenedImage,
    digest: string,
    size: number,
    options: BlobOptions = {},
  ): Promise<BlobReader> {
    const path = this.path(digest);
    const hit = await this.#open(path, size);
    if (hit !== null) return { size, stream: this.#hitStream(hit, path, digest) };
    const blob = await proxy.getBlob(image, digest, size, options);
    return { size: blob.size, stream: await this.#fillStream(blob.stream, path) };
  }

  /**
   * The blob `digest` fetched with `GetRawBlob`: from the cache when it is there (with the size
   * `options.size`, when given), else from `proxy`, written to the cache as it streams. The proxy's
   * stream closes normally only once this client matched size and digest, so only verified bytes are
   * kept.
   */
  async getRawBlob(
    proxy: Pick<ImageProxy, "getRawBlob">,
    image: OpenedImage,
    digest: string,
    options: RawBlobOptions = {},
  ): Promise<BlobReader> {
    const path = this.path(digest);
    const hit = await this.#open(path, options.size);
    if (hit !== null) {
      const { size } = await hit.stat();
      return { size, stream: this.#hitStream(hit, path, digest) };
    }
    const blob = await proxy.getRawBlob(image, digest, options);
    return { size: blob.size, stream: await this.#fillStream(blob.stream, path) };
  }

  /**
   * Saves the blob `digest` of `size` bytes into the file `target`, as `ImageProxy.saveBlob` does. A
   * hit is copied and hashed on the way (a corrupted one is removed and the blob fetched instead); a
   * miss is saved by `proxy`, which verified it once this resolves, and then copied into the cache.
   *
   * @returns the blob's size.
   */
  async saveBlob(
    proxy: Pick<ImageProxy, "saveBlob">,
    image: OpenedImage,
    digest: string,
    size: number,
    target: string,
    options: SaveBlobOptions = {},
  ): Promise<number> {
    const path = this.path(digest);
    options.signal?.throwIfAborted();
    const hit = await this.#open(path, size);
    if (hit !== null && await this.#copyVerified(hit, path, digest, target, options)) return size;
    const saved = await proxy.saveBlob(image, digest, size, target, options);
    await mkdir(join(path, ".."), { recursive: true });
    const temporary = this.#temporary(path);
    try {
      await copyFile(target, temporary);
      await rename(temporary, path);
    } catch (err) {
      await rm(temporary, { force: true });
      throw err;
    }
    await this.#evict(path);
    return saved;
  }

  /**
   * Copies the open cached blob into `target`, hashing it on the way; flushed to disk. Returns false
   * (and removes the cached blob) when its bytes do not match `digest`.
   */
  async #copyVerified(
    hit: Awaited<ReturnType<typeof open>>,
    path: string,
    digest: string,
    target: string,
    options: SaveBlobOptions,
  ): Promise<boolean> {
    const hash = createHash(digest.slice(0, digest.indexOf(":")));
    try {
      const out = await open(target, "w", 0o644);
      try {
        const buffer = new Uint8Array(1 << 20);
        for (;;) {
          options.signal?.throwIfAborted();
          const { bytesRead } = await hit.read(buffer, 0, buffer.length);
          if (bytesRead === 0) break;
          hash.update(buffer.subarray(0, bytesRead));
          let offset = 0;
          while (offset < bytesRead) {
            offset += (await out.write(buffer, offset, bytesRead - offset)).bytesWritten;
          }
          options.onProgress?.(bytesRead);
        }
        await out.sync();
      } finally {
        await out.close();
      }
    } finally {
      await hit.close();
    }
    if (`${digest.slice(0, digest.indexOf(":"))}:${hash.digest("hex")}` === digest) return true;
    await rm(path, { force: true });
    return false;
  }

  #temporary(path: string): string {
    return join(path, "..", `${TEMPORARY}${process.pid}-${crypto.randomUUID()}`);
  }

  /** The cached blob at `path`, open, when it is there with `size` bytes (any size when undefined). */
  async #open(path: string, size: number | undefined) {
    let handle;
    try {
      handle = await open(path, "r");
    } catch {
      return null;
    }
    if (size !== undefined && (await handle.stat()).size !== size) {
      await handle.close();
      await rm(path, { force: true });
      return null;
    }
    const now = new Date();
    await utimes(path, now, now).catch(() => {}); // Recently used; it may have been evicted already.
    return handle;
  }

  #hitStream(
    handle: Awaited<ReturnType<typeof open>>,
    path: string,
    digest: string,
  ): ReadableStream<Uint8Array> {
    const hash = createHash(digest.slice(0, digest.indexOf(":")));
    return new ReadableStream<Uint8Array>({
      async pull(controller) {
        const buffer = new Uint8Array(1 << 16);
        const { bytesRead } = await handle.read(buffer, 0, buffer.length);
        if (bytesRead > 0) {
          hash.update(buffer.subarray(0, bytesRead));
          controller.enqueue(buffer.subarray(0, bytesRead));
          return;
        }
        await handle.close();
        const actual = `${digest.slice(0, digest.indexOf(":"))}:${hash.digest("hex")}`;
        if (actual !== digest) {
          await rm(path, { force: true });
          controller.error(
            new BlobError(`Cached blob ${digest} is corrupted (got ${actual}): removed`, digest, true),
          );
          return;
        }
        controller.close();
      },
      async cancel() {
        await handle.close();
      },
    }, { highWaterMark: 0 });
  }

  async #fillStream(source: ReadableStream<Uint8Array>, path: string): Promise<ReadableStream<Uint8Array>> {
    await mkdir(join(path, ".."), { recursive: true });
    const temporary = this.#temporary(path);
    const file = await open(temporary, "wx", 0o644);
    const reader = source.getReader();
    const discard = async () => {
      await file.close().catch(() => {});
      await rm(temporary, { force: true });
    };
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        let result;
        try {
          result = await reader.read();
          if (!result.done) {
            let offset = 0;
            while (offset < result.value.length) {
              offset += (await file.write(result.value, offset)).bytesWritten;
            }
          }
        } catch (err) {
          await discard();
          throw err;
        }
        if (!result.done) return controller.enqueue(result.value);
        // The proxy's stream closed normally: size and digest were confirmed.
        await file.close();
        await rename(temporary, path);
        await this.#evict(path);
        controller.close();
      },
      cancel: async (reason) => {
        await reader.cancel(reason).catch(() => {});
        await discard();
      },
    }, { highWaterMark: 0 });
  }

  /** Removes the least recently used blobs (never `keep`) until the rest fit `maxBytes`. */
  async #evict(keep: string): Promise<void> {
    const blobs: { path: string; size: number; used: number }[] = [];
    const root = join(this.dir, "blobs");
    for (const algorithm of await readdir(root).catch(() => [] as string[])) {
      for (const name of await readdir(join(root, algorithm)).catch(() => [] as string[])) {
        if (name.startsWith(TEMPORARY)) continue;
        const path = join(root, algorithm, name);
        const info = await stat(path).catch(() => null);
        if (info?.isFile()) blobs.push({ path, size: info.size, used: info.mtimeMs });
      }
    }
    let total = blobs.reduce((n, b) => n + b.size, 0);
    blobs.sort((a, b) => a.used - b.used);
    for (const blob of blobs) {
      if (total <= this.maxBytes) break;
      if (blob.path === keep) continue;
      await rm(blob.path, { force: true });
      total -= blob.size;
    }
  }
}

/**
 * Routes every blob the proxy hands out through `cache`: `getBlob` (and `getDescriptor`, which calls
 * it), `getRawBlob` and `saveBlob`, for every reader of this proxy: the inspect functions,
 * `extractImage`, `writeLayout`, the CLI's commands.
 *
 * @example Reading an image twice, fetching its layers once
 * ```ts ignore
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { BlobCache, useBlobCache, listImage } from "jsr:@cip/containers-image-proxy/inspect";
 *
 * await using proxy = await ImageProxy.spawn();
 * useBlobCache(proxy, new BlobCache("/var/cache/image-blobs", { maxBytes: 2 ** 30 }));
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * for await (const e of listImage(proxy, img)) console.log(e.path);
 * ```
 *
 * @param proxy the proxy whose blob methods to wrap (its own methods are replaced).
 * @param cache the cache to serve from and fill.
 * @returns `proxy`.
 */
export function useBlobCache(proxy: ImageProxy, cache: BlobCache): ImageProxy {
  const getBlob = proxy.getBlob.bind(proxy);
  const getRawBlob = proxy.getRawBlob.bind(proxy);
  const saveBlob = proxy.saveBlob.bind(proxy);
  proxy.getBlob = (image, digest, size, options) => cache.getBlob({ getBlob }, image, digest, size, options);
  proxy.getRawBlob = (image, digest, options) => cache.getRawBlob({ getRawBlob }, image, digest, options);
  // A proxy that cannot save blobs says so, hit or miss.
  proxy.saveBlob = (image, digest, size, path, options) =>
    proxy.canSaveBlobs
      ? cache.saveBlob({ saveBlob }, image, digest, size, path, options)
      : saveBlob(image, digest, size, path, options);
  return proxy;
}
