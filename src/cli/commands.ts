/**
 * The `image-proxy` commands, each given a started proxy and an opened image.
 *
 * @module
 */

import type { ImageProxy, OpenedImage } from "../proxy.ts";
import type { ConvertedLayerInfo } from "../oci.ts";
import { UnsupportedMethodError } from "../errors.ts";
import { METHOD_VERSIONS } from "../protocol.ts";
import { extractImage, type LayerProgress } from "../image/extract.ts";
import { writeLayout } from "../image/layout.ts";
import type { ParsedArgs } from "./args.ts";
import { cat, exportCommand, ls, platforms } from "./inspect.ts";
import type { CliIo } from "./io.ts";
import type { ProgressLine } from "./progress.ts";

/** What every command gets. */
export interface CommandContext {
  /** The running proxy. */
  proxy: ImageProxy;
  /** The image REF names, opened. */
  image: OpenedImage;
  /** The parsed command line. */
  args: ParsedArgs;
  /** Output. */
  io: CliIo;
  /** The progress display (inert unless stderr is a terminal and not `--quiet`). */
  progress: ProgressLine;
  /** Aborted on SIGINT or SIGTERM. */
  signal: AbortSignal;
}

/**
 * Prints `value` as JSON, two-space indented, with a final newline. JSON escapes C0 controls but leaves
 * DEL and C1 raw, and a terminal may act on C1 (U+009B is a CSI): those are escaped too (`\u009b`),
 * which is still the same JSON value.
 */
export function printJson(io: CliIo, value: unknown): Promise<void> {
  const json = JSON.stringify(value, null, 2).replace(
    /[\x7f-\x9f]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
  return io.writeStdout(`${json}\n`);
}

function layerProgress(ctx: CommandContext, action: string) {
  return (p: LayerProgress) =>
    ctx.progress.update({
      action,
      layer: p.layer,
      layers: p.layers,
      bytes: p.bytes,
      totalBytes: p.totalBytes,
    });
}

async function metadata(ctx: CommandContext): Promise<void> {
  const { digest, manifest } = await ctx.proxy.fetchManifest(ctx.image);
  await printJson(ctx.io, { digest, manifest });
}

async function config(ctx: CommandContext): Promise<void> {
  await printJson(ctx.io, await ctx.proxy.fetchConfig(ctx.image));
}

async function layers(ctx: CommandContext): Promise<void> {
  let info: ConvertedLayerInfo[] | null = await ctx.proxy.getLayerInfo(ctx.image);
  if (info === null) {
    // Before protocol 0.2.5 there is no GetLayerInfo; the manifest says the same for unconverted images.
    const { manifest } = await ctx.proxy.fetchManifest(ctx.image);
    info = manifest.layers.map((l) => ({ digest: l.digest, size: l.size, media_type: l.mediaType }));
  }
  await printJson(ctx.io, info);
}

async function copyToStdout(ctx: CommandContext, stream: ReadableStream<Uint8Array>, size: number) {
  let bytes = 0;
  for await (const chunk of stream) {
    bytes += chunk.length;
    ctx.progress.update({ action: "blob", bytes, totalBytes: size >= 0 ? size : undefined });
    await ctx.io.writeStdout(chunk);
  }
}

async function blob(ctx: CommandContext): Promise<void> {
  const [, digest, size] = ctx.args.operands;
  const reader = await ctx.proxy.getBlob(ctx.image, digest, Number(size), { signal: ctx.signal });
  await copyToStdout(ctx, reader.stream, reader.size);
}

async function blobRaw(ctx: CommandContext): Promise<void> {
  const [, digest] = ctx.args.operands;
  // The manifest's size for the blob bounds the stream when the registry sends no length.
  const { manifest } = await ctx.proxy.fetchManifest(ctx.image);
  const size = [manifest.config, ...manifest.layers].find((d) => d.digest === digest)?.size;
  const reader = await ctx.proxy.getRawBlob(ctx.image, digest, { size, signal: ctx.signal });
  await copyToStdout(ctx, reader.stream, reader.size);
}

function requireRawBlobs(proxy: ImageProxy): void {
  if (!proxy.supports("GetRawBlob")) {
    throw new UnsupportedMethodError(
      "GetRawBlob",
      METHOD_VERSIONS.GetRawBlob,
      proxy.protocolVersion,
      "--raw-blobs",
    );
  }
}

async function fetchImage(ctx: CommandContext): Promise<void> {
  const { proxy, image, args, signal } = ctx;
  if (args.rawBlobs) requireRawBlobs(proxy);
  if (args.output !== undefined) {
    const result = await writeLayout(proxy, image, args.output, {
      rawBlobs: args.rawBlobs,
      signal,
      onProgress: layerProgress(ctx, "fetching"),
    });
    ctx.progress.clear();
    await printJson(ctx.io, {
      reference: image.reference.toString(),
      layout: `oci:${result.path}:${result.tag}`,
      ...result,
    });
    return;
  }
  // No output: stream every blob through, verified, and count.
  const { digest, manifest } = await proxy.fetchManifest(image);
  const get = (d: { digest: string; size: number }) =>
    args.rawBlobs
      ? proxy.getRawBlob(image, d.digest, { size: d.size, signal })
      : proxy.getBlob(image, d.digest, d.size, { signal });
  const drain = async (stream: ReadableStream<Uint8Array>, onBytes: (n: number) => void) => {
    for await (const chunk of stream) onBytes(chunk.length);
  };
  await drain((await get(manifest.config)).stream, () => {});
  const totalBytes = manifest.layers.reduce((n, l) => n + l.size, 0);
  let bytes = 0;
  for (const [i, layer] of manifest.layers.entries()) {
    const report = () =>
      ctx.progress.update({
        action: "fetching",
        layer: i + 1,
        layers: manifest.layers.length,
        bytes,
        totalBytes,
      });
    report();
    await drain((await get(layer)).stream, (n) => {
      bytes += n;
      report();
    });
  }
  ctx.progress.clear();
  await printJson(ctx.io, {
    reference: image.reference.toString(),
    digest,
    config: { digest: manifest.config.digest, size: manifest.config.size },
    layers: manifest.layers.map((l) => ({ digest: l.digest, size: l.size, mediaType: l.mediaType })),
    bytesFetched: bytes + manifest.config.size,
    verified: true,
  });
}

async function extract(ctx: CommandContext): Promise<void> {
  const [, dir] = ctx.args.operands;
  const result = await extractImage(ctx.proxy, ctx.image, dir, {
    signal: ctx.signal,
    onProgress: layerProgress(ctx, "extracting"),
    overwrite: ctx.args.overwrite,
    sameOwner: ctx.args.noSameOwner ? false : undefined,
    xattrs: !ctx.args.noXattrs,
  });
  ctx.progress.clear();
  const sum = (
    key:
      | "files"
      | "directories"
      | "symlinks"
      | "hardlinks"
      | "whiteouts"
      | "bytes"
      | "xattrs"
      | "xattrsSkipped",
  ) => result.layers.reduce((n, l) => n + l[key], 0);
  await printJson(ctx.io, {
    reference: ctx.image.reference.toString(),
    digest: result.digest,
    path: dir,
    files: sum("files"),
    directories: sum("directories"),
    symlinks: sum("symlinks"),
    hardlinks: sum("hardlinks"),
    whiteouts: sum("whiteouts"),
    bytes: sum("bytes"),
    xattrs: sum("xattrs"),
    xattrsSkipped: sum("xattrsSkipped"),
    skipped: result.layers.flatMap((l) => l.skipped),
    skippedCount: result.layers.reduce((n, l) => n + l.skippedCount, 0),
    layers: result.layers.map((l) => ({
      digest: l.digest,
      size: l.size,
      compression: l.compression,
      entries: l.entries,
    })),
  });
}

/** The commands, by name. */
export const HANDLERS: Record<string, (ctx: CommandContext) => Promise<void>> = {
  metadata,
  config,
  layers,
  blob,
  "blob-raw": blobRaw,
  fetch: fetchImage,
  extract,
  ls,
  cat,
  export: exportCommand,
};

/** What a command that needs no proxy gets; it returns the exit status. */
export type ContextWithoutProxy = Pick<CommandContext, "args" | "io" | "signal">;

/**
 * The commands that run without a proxy and without opening REF first (`platforms`: opening a manifest
 * list resolves it to one platform, or fails when the list lacks this machine's).
 */
export const WITHOUT_PROXY: Record<string, (ctx: ContextWithoutProxy) => Promise<number>> = {
  platforms,
};
