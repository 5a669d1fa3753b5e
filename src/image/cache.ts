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
 * Only `getBlob` (and `getDescriptor`, which calls it) goes through the cache; `saveBlob` and
 * `getRawBlob` do not.
 *
 * @module
 * @tags allow-read, allow-write
 */

import { createHash } from "node:crypto";
import { mkdir, open, readdir, rename, rm, stat, utimes } from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import { BlobError } from "../errors.ts";
import type { BlobOptions, BlobReader, ImageProxy, OpenedImage } from "../proxy.ts";
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

  async #open(path: string, size: number) {
    let handle;
    try {
      handle = await open(path, "r");
    } catch {
      return null;
    }
    if ((await handle.stat()).size !== size) {
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
    const temporary = join(path, "..", `${TEMPORARY}${process.pid}-${crypto.randomUUID()}`);
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
 * Routes `proxy.getBlob` (and `getDescriptor`, which calls it) through `cache`, for every reader of
 * this proxy: the inspect functions, `extractImage`, the CLI's commands.
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
 * @returns `proxy`.
 */
export function useBlobCache(proxy: ImageProxy, cache: BlobCache): ImageProxy {
  const fetch = proxy.getBlob.bind(proxy);
  proxy.getBlob = (image, digest, size, options) =>
    cache.getBlob({ getBlob: fetch }, image, digest, size, options);
  return proxy;
}
