/**
 * Looking inside images without unpacking them: the merged file view (whiteouts applied), one file's
 * content, the flattened file system as one tar, the platforms of a multi-arch image, the layers as
 * verified tar entries, and an opt-in blob cache on disk. Every reader checks each layer's uncompressed bytes
 * against the configuration's `rootfs.diff_ids` as it streams (on by default).
 *
 * @example Listing an image and reading one file
 * ```ts ignore
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { listImage, readFile } from "jsr:@cip/containers-image-proxy/inspect";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * for await (const entry of listImage(proxy, img)) console.log(entry.type, entry.path);
 * const text = await new Response(await readFile(proxy, img, "/etc/os-release")).text();
 * ```
 *
 * @module
 * @tags allow-ffi, allow-run, allow-env, allow-read, allow-write
 */

export { type FileEntry, findInImage, listImage, type ViewOptions } from "./view.ts";
export { readFile } from "./read-file.ts";
export { exportImage, type ExportOptions } from "./export.ts";
export { BlobCache, type BlobCacheOptions, DEFAULT_CACHE_BYTES, useBlobCache } from "./cache.ts";
export {
  formatPlatform,
  type ImagePlatform,
  inspectArgv,
  InspectError,
  InvalidPlatformError,
  listPlatforms,
  parsePlatform,
  platformConfig,
  type PlatformName,
} from "./platforms.ts";
export {
  DiffIdMismatchError,
  FileNotFoundError,
  type FileType,
  type ImageLayer,
  imageLayers,
  layerEntries,
  type LayerSource,
  MAX_SYMLINK_HOPS,
  NotAFileError,
  type ReadLayerOptions,
  SymlinkLoopError,
} from "./layers.ts";
