/**
 * Writes an image fetched through the proxy as an OCI image layout (`oci-layout`, `index.json`,
 * `blobs/sha256/...`), which `skopeo`, `podman` and every OCI tool read as `oci:DIR:TAG`.
 *
 * Every blob goes to a temporary name in its final folder (moved there by the adapter with
 * `ImageProxy.saveBlob` when it can, streamed through this process otherwise) and is renamed only
 * once the proxy (or, for raw blobs, this client) has verified it, so an interrupted fetch never
 * leaves a blob that looks complete. Blobs already present with the right digest are not fetched
 * again. The manifest and `index.json` are written last.
 *
 * Nothing a digest says becomes a path before it is checked (`sha256` or `sha512`, lowercase hex of
 * the right length), and no symbolic link inside the layout folder is followed: folders are created
 * one at a time and checked, files that may already be there are opened with `O_NOFOLLOW`, and a link
 * found where the layout needs a file or folder fails with a {@linkcode LayoutError}.
 *
 * @module
 * @tags allow-read, allow-write
 */

import { createHash, randomUUID } from "node:crypto";
import { open, rename, rm } from "node:fs/promises";
import { type Compression, detectCompression } from "./decompress.ts";
export type { Compression } from "./decompress.ts";
import { ImageProxyError, LayoutError, ProtocolError, UnsupportedMethodError } from "../errors.ts";
import {
  existingFile,
  fileHead,
  makeFolders,
  openExisting,
  readLayoutFile,
  writeAtomically,
} from "./layout-files.ts";
import {
  checkContentDigest,
  checkManifest,
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
} from "../oci.ts";
import type { BlobReader, ImageProxy, OpenedImage } from "../proxy.ts";
import { METHOD_VERSIONS } from "../protocol.ts";
import type { ImageReference } from "../reference.ts";
import type { LayerProgress } from "./extract.ts";

/** The annotation that names an image in a layout's `index.json`. */
export const REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name";

/** Options for {@linkcode writeLayout}. */
export interface WriteLayoutOptions {
  /** The name under which `index.json` lists the image; default {@linkcode layoutTag} of the reference. */
  tag?: string;
  /** Fetch blobs with `GetRawBlob` (where the proxy has it), verified by this client instead of by skopeo. */
  rawBlobs?: boolean;
  /** Stops the fetch; partial blobs are removed. */
  signal?: AbortSignal;
  /** Called as layer bytes arrive (often: throttle any display). */
  onProgress?: (progress: LayerProgress) => void;
  /**
   * How many blobs stream at once on the one proxy (default 6, as `skopeo copy` downloads). skopeo
   * hashes each GetBlob copy on its own goroutine, so several at once use a second core where one
   * cannot, and a last large layer does not start alone after the others.
   */
  concurrency?: number;
}

/** One blob of the written layout. */
export interface LayoutBlob {
  /** The blob's digest (its file name under `blobs/`). */
  digest: string;
  /** Its size in bytes. */
  size: number;
  /** Its media type, as the layout's manifest states it. */
  mediaType: string;
  /** True when the blob was already in the layout and was not fetched again. */
  skipped: boolean;
}

/** What {@linkcode writeLayout} wrote. */
export interface LayoutResult {
  /** The layout folder. */
  path: string;
  /** The name the image has in `index.json`. */
  tag: string;
  /** The digest of the manifest as stored in the layout (the sha256 of its bytes). */
  digest: string;
  /** The manifest digest the proxy reported for the source image. */
  sourceDigest: string;
  /** The configuration blob. */
  config: LayoutBlob;
  /** The layer blobs, in order, with the compression their content has. */
  layers: (LayoutBlob & { compression: Compression })[];
  /** Blob bytes fetched (skipped blobs not counted). */
  bytesFetched: number;
  /** Where the layout differs from the source, said plainly (converted manifest, corrected media types). */
  notes: string[];
}

/** Layer media types whose compression suffix this writer can correct. */
const OCI_LAYER = "application/vnd.oci.image.layer.v1.tar";
const OCI_LAYER_TYPES: Record<string, Compression> = {
  [OCI_LAYER]: "none",
  [`${OCI_LAYER}+gzip`]: "gzip",
  [`${OCI_LAYER}+zstd`]: "zstd",
};

/**
 * The tag an image gets in a layout: the reference's tag, or `latest` when it has none (a digest
 * reference, `dir:`, an archive without a name).
 */
export function layoutTag(reference: ImageReference): string {
  let name: string;
  switch (reference.transport) {
    case "oci":
    case "oci-archive": {
      const colon = reference.name.indexOf(":");
      const inner = colon >= 0 ? reference.name.slice(colon + 1) : "";
      if (inner === "") return "latest";
      if (!inner.includes("/") && !inner.includes(":") && !inner.includes("@")) return inner;
      name = inner;
      break;
    }
    case "docker":
      name = reference.name.slice(2);
      break;
    case "docker-archive": {
      const colon = reference.name.indexOf(":");
      name = colon >= 0 ? reference.name.slice(colon + 1) : "";
      break;
    }
    case "containers-storage":
      name = reference.name.replace(/^\[[^\]]*\]/, "");
      break;
    case "dir":
      return "latest";
    default:
      name = reference.name;
  }
  if (name.includes("@")) return "latest";
  const slash = name.lastIndexOf("/");
  const colon = name.lastIndexOf(":");
  return colon > slash ? name.slice(colon + 1) : "latest";
}

function sha256(data: Uint8Array): string {
  return `sha256:${createHash("sha256").update(data).digest("hex")}`;
}

/** Where a blob goes, as the folder below `blobs/` and the file name in it; the digest is checked first. */
function blobName(digest: string): { algorithm: string; encoded: string } {
  checkContentDigest(digest, "A blob digest");
  const colon = digest.indexOf(":");
  return { algorithm: digest.slice(0, colon), encoded: digest.slice(colon + 1) };
}

function blobPath(dir: string, digest: string): string {
  const { algorithm, encoded } = blobName(digest);
  return `${dir}/blobs/${algorithm}/${encoded}`;
}

/** Whether `path` holds exactly the blob `digest` of `size` bytes; the first bytes come back too. */
async function existingBlob(
  path: string,
  digest: string,
  size: number,
): Promise<{ head: Uint8Array } | null> {
  const { algorithm } = blobName(digest);
  const handle = await openExisting(path);
  if (!handle) return null;
  const hash = createHash(algorithm);
  const buffer = new Uint8Array(1 << 20);
  let head: Uint8Array | undefined;
  try {
    if (size >= 0 && (await handle.stat()).size !== size) return null;
    for (;;) {
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, null);
      if (bytesRead === 0) break;
      head ??= buffer.slice(0, Math.min(bytesRead, 8));
      hash.update(buffer.subarray(0, bytesRead));
    }
  } finally {
    await handle.close();
  }
  return `${algorithm}:${hash.digest("hex")}` === digest ? { head: head ?? new Uint8Array(0) } : null;
}

/** How a blob gets into a file: streamed through this process, or saved by the proxy's adapter. */
type BlobSource =
  | { stream: () => Promise<BlobReader> }
  | { save: (path: string, onBytes: (count: number) => void) => Promise<number> };

/**
 * Streams a blob into the layout unless it is already there. Returns its first bytes (to tell its
 * compression) and how many bytes were fetched.
 */
async function storeBlob(
  dir: string,
  descriptor: Descriptor,
  source: BlobSource,
  onBytes: (count: number) => void,
): Promise<{ head: Uint8Array; fetched: number; skipped: boolean }> {
  const path = blobPath(dir, descriptor.digest);
  await makeFolders(dir, ["blobs", blobName(descriptor.digest).algorithm]);
  const present = await existingBlob(path, descriptor.digest, descriptor.size);
  if (present) return { head: present.head, fetched: 0, skipped: true };
  const temporary = `${path.slice(0, path.lastIndexOf("/"))}/.${
    path.slice(path.lastIndexOf("/") + 1)
  }.partial-${randomUUID()}`;
  if ("save" in source) {
    try {
      // Verified by the proxy and flushed once this resolves.
      const fetched = await source.save(temporary, onBytes);
      const head = await fileHead(temporary);
      await rename(temporary, path);
      return { head, fetched, skipped: false };
    } catch (err) {
      await rm(temporary, { force: true });
      throw err;
    }
  }
  const { stream } = await source.stream();
  let fetched = 0;
  let head: Uint8Array | undefined;
  try {
    const handle = await open(temporary, "wx", 0o644);
    try {
      for await (const chunk of stream) {
        head ??= chunk.slice(0, 8);
        let offset = 0;
        while (offset < chunk.length) {
          const { bytesWritten } = await handle.write(chunk, offset, chunk.length - offset);
          offset += bytesWritten;
        }
        fetched += chunk.length;
        onBytes(chunk.length);
      }
      // The stream closed: the proxy (or the raw-blob check) confirmed size and digest.
      await handle.sync();
    } finally {
      await handle.close();
    }
    if (descriptor.size >= 0 && fetched !== descriptor.size) {
      throw new ImageProxyError(
        `Blob ${descriptor.digest} has ${fetched} bytes, but the manifest says ${descriptor.size}`,
      );
    }
    await rename(temporary, path);
  } catch (err) {
    await stream.cancel().catch(() => {});
    await rm(temporary, { force: true });
    throw err;
  }
  return { head: head ?? new Uint8Array(0), fetched, skipped: false };
}

/** The largest `index.json` read back (a layout listing some hundred thousand tags). */
const MAX_INDEX_BYTES = 64 << 20;
/** The largest `oci-layout` read back: it is one short JSON object. */
const MAX_OCI_LAYOUT_BYTES = 64 << 10;

/** Parses JSON; `undefined` when it is not. The parser's message would quote the file, so it is dropped. */
function parseOrUndefined(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

async function readIndex(path: string): Promise<ImageIndex> {
  const text = await readLayoutFile(path, MAX_INDEX_BYTES);
  if (text === null) {
    return { schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: [] };
  }
  const index = parseOrUndefined(text) as ImageIndex | undefined;
  if (index?.schemaVersion !== 2 || !Array.isArray(index.manifests)) {
    throw new LayoutError(path, "is not a valid OCI image index");
  }
  return index;
}

async function ensureLayoutFile(dir: string): Promise<void> {
  const path = `${dir}/oci-layout`;
  const text = await readLayoutFile(path, MAX_OCI_LAYOUT_BYTES);
  if (text === null) {
    await writeAtomically(path, JSON.stringify({ imageLayoutVersion: "1.0.0" }));
    return;
  }
  const layout = parseOrUndefined(text) as { imageLayoutVersion?: unknown } | undefined;
  if (typeof layout?.imageLayoutVersion !== "string") {
    throw new LayoutError(path, "is not a valid oci-layout file (JSON with an imageLayoutVersion)");
  }
}

/**
 * Writes `image` into the OCI image layout `dir` (created if missing; an existing layout keeps its
 * other images, and an image with the same tag is replaced in `index.json`).
 *
 * The manifest is stored as the proxy returns it: converted to OCI. When the source manifest was in
 * another format (`docker-archive:`, a Docker registry), the layout's manifest digest differs from the
 * source's; both are returned and `notes` says so. When a layer's content contradicts its media type
 * (`docker-archive:` layers are uncompressed but labelled gzip), the media type is corrected in the
 * stored manifest, so that the layout states what its blobs are.
 *
 * @example Saving an image as a layout
 * ```ts
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { writeLayout } from "jsr:@cip/containers-image-proxy/layout";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * const result = await writeLayout(proxy, img, "./alpine-layout");
 * console.log(`oci:${result.path}:${result.tag}`, result.digest);
 * ```
 *
 * @throws {UnsupportedMethodError} with `rawBlobs` on a proxy that lacks `GetRawBlob`.
 * @throws {ProtocolError} when the manifest is not an OCI image manifest, or a digest in it is not a
 * `sha256` or `sha512` digest (nothing is written then).
 * @throws {LayoutError} when a symbolic link, or a file of the wrong kind, is found inside `dir` where
 * the layout needs a folder or a file, or `oci-layout` or `index.json` is not valid.
 */
export async function writeLayout(
  proxy: ImageProxy,
  image: OpenedImage,
  dir: string,
  options: WriteLayoutOptions = {},
): Promise<LayoutResult> {
  const { signal, onProgress } = options;
  if (options.rawBlobs && !proxy.supports("GetRawBlob")) {
    throw new UnsupportedMethodError(
      "GetRawBlob",
      METHOD_VERSIONS.GetRawBlob,
      proxy.protocolVersion,
      'Option "rawBlobs"',
    );
  }
  const tag = options.tag ?? layoutTag(image.reference);
  const { digest: sourceDigest, raw } = await proxy.fetchManifestRaw(image);
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder().decode(raw));
  } catch (cause) {
    throw new ProtocolError("The proxy returned a manifest that is not JSON", { cause });
  }
  // Before anything is written: a descriptor's digest becomes a path below the layout.
  const parsed: ImageManifest = checkManifest(value);
  await makeFolders(dir, ["blobs", "sha256"]);
  await ensureLayoutFile(dir);
  // A link planted under a blob's name is refused here, before any download starts, rather than in
  // the middle of them (each blob is checked again when it is stored).
  const descriptors = [parsed.config, ...parsed.layers];
  for (const algorithm of new Set(descriptors.map((d) => blobName(d.digest).algorithm))) {
    await makeFolders(dir, ["blobs", algorithm]);
  }
  for (const descriptor of descriptors) await existingFile(blobPath(dir, descriptor.digest));

  // One failure stops the other blobs at once, so that no stream is left open behind the error.
  const stop = new AbortController();
  const fetchSignal = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
  // Blobs the proxy verifies go straight from its pipe into the file when the adapter can do that.
  const fetchBlob = (descriptor: Descriptor): BlobSource =>
    options.rawBlobs
      ? {
        stream: () =>
          proxy.getRawBlob(image, descriptor.digest, { size: descriptor.size, signal: fetchSignal }),
      }
      : proxy.canSaveBlobs
      ? {
        save: (path, onBytes) =>
          proxy.saveBlob(image, descriptor.digest, descriptor.size, path, {
            signal: fetchSignal,
            onProgress: onBytes,
          }),
      }
      : { stream: () => proxy.getDescriptor(image, descriptor, { signal: fetchSignal }) };
  const notes: string[] = [];
  const totalBytes = parsed.layers.reduce((n, l) => n + l.size, 0);
  let bytes = 0;

  signal?.throwIfAborted();
  // The config and the layers share one pool; index -1 is the config.
  const stored: { head: Uint8Array; fetched: number; skipped: boolean }[] = [];
  let configStored: { head: Uint8Array; fetched: number; skipped: boolean } | undefined;
  const jobs = [-1, ...parsed.layers.keys()];
  const concurrency = Math.max(1, Math.min(options.concurrency ?? 6, jobs.length));
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const i = jobs[next++];
      fetchSignal.throwIfAborted();
      if (i < 0) {
        configStored = await storeBlob(dir, parsed.config, fetchBlob(parsed.config), () => {});
        continue;
      }
      const layer = parsed.layers[i];
      let layerBytes = 0;
      const report = () =>
        onProgress?.({
          layer: i + 1,
          layers: parsed.layers.length,
          layerBytes,
          layerSize: layer.size,
          bytes,
          totalBytes,
        });
      report();
      stored[i] = await storeBlob(dir, layer, fetchBlob(layer), (n) => {
        layerBytes += n;
        bytes += n;
        report();
      });
    }
  };
  const results = await Promise.allSettled(Array.from({ length: concurrency }, () =>
    worker().catch((err) => {
      stop.abort(err);
      throw err;
    })));
  const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (failed) {
    // Report the user's abort, or the first real failure rather than the aborts it caused.
    throw signal?.aborted ? signal.reason : stop.signal.reason ?? failed.reason;
  }

  let bytesFetched = configStored!.fetched;
  const config: LayoutBlob = {
    digest: parsed.config.digest,
    size: parsed.config.size,
    mediaType: parsed.config.mediaType,
    skipped: configStored!.skipped,
  };
  const layers: LayoutResult["layers"] = [];
  let corrected = false;
  for (const [i, layer] of parsed.layers.entries()) {
    bytesFetched += stored[i].fetched;
    const found = detectCompression(stored[i].head);
    const compression: Compression = found === "gzip" || found === "zstd" ? found : "none";
    let mediaType = layer.mediaType;
    const claimed = OCI_LAYER_TYPES[mediaType];
    if (claimed !== undefined && claimed !== compression) {
      mediaType = compression === "none" ? OCI_LAYER : `${OCI_LAYER}+${compression}`;
      notes.push(
        `Layer ${layer.digest} is labelled "${layer.mediaType}" but its content is ${
          compression === "none" ? "an uncompressed tar" : compression
        }: the layout's manifest says "${mediaType}"`,
      );
      parsed.layers[i] = { ...layer, mediaType };
      corrected = true;
    }
    layers.push({
      digest: layer.digest,
      size: layer.size,
      mediaType,
      skipped: stored[i].skipped,
      compression,
    });
  }

  const manifestBytes = corrected ? new TextEncoder().encode(JSON.stringify(parsed)) : raw;
  const digest = sha256(manifestBytes);
  if (digest !== sourceDigest) {
    notes.unshift(
      `The proxy converted the source manifest (${sourceDigest}) to OCI${
        corrected ? " and its layer media types were corrected" : ""
      }: the layout's manifest is ${digest}`,
    );
  }
  const manifestPath = blobPath(dir, digest);
  if (!(await existingBlob(manifestPath, digest, manifestBytes.length))) {
    await writeAtomically(manifestPath, manifestBytes);
  }

  const index = await readIndex(`${dir}/index.json`);
  index.manifests = index.manifests.filter((m) => m.annotations?.[REF_NAME_ANNOTATION] !== tag);
  index.manifests.push({
    mediaType: parsed.mediaType ?? "application/vnd.oci.image.manifest.v1+json",
    digest,
    size: manifestBytes.length,
    annotations: { [REF_NAME_ANNOTATION]: tag },
  });
  await writeAtomically(`${dir}/index.json`, JSON.stringify(index));
  return { path: dir, tag, digest, sourceDigest, config, layers, bytesFetched, notes };
}
