/**
 * One file's content from an image, without unpacking it: layers are read from the top, and the search
 * stops at the first layer that holds the path or hides it (a whiteout, an opaque parent); no layer
 * below that one is fetched. Symlinks along the path and at its end are followed inside the image root
 * (an absolute or `..` target never leaves it), at most {@linkcode MAX_SYMLINK_HOPS} times; a hardlink
 * resolves to its target's content as of the hardlink's layer.
 *
 * Layer entries are matched by the names they carry, which is exact as long as each entry's parent
 * directory was itself an entry earlier in its layer (as in layers built from a file system): a
 * directory entry replaces a symlink below it. An entry whose parent was not (`lib/x` alone, over a
 * lower layer's symlink `lib -> usr/lib`) may land elsewhere (`usr/lib/x`, in an extraction and in
 * `listImage`'s view). When the search meets such an entry, it starts again the way the view is built:
 * every layer's headers are read, bottom first, each entry is placed with its parents' symlinks
 * resolved, and the search runs over those places (a file's bytes are then fetched again from its
 * layer).
 *
 * Cost: each symlink that changes the path starts the search again from the top layer, but the layers
 * already read to their end in this call are searched again from memory (their entries' headers, no
 * content), so a layer is fetched a second time only for the content of the file found in it (or of a
 * hardlink's target, whose bytes came earlier in the archive). Memory: the headers of those layers.
 *
 * @module
 */

import type { OpenedImage } from "../proxy.ts";
import { LayerError } from "./extract.ts";
import {
  entryParts,
  FileNotFoundError,
  type FileType,
  fileType,
  type ImageLayer,
  imageLayers,
  layerEntries,
  type LayerSource,
  MAX_SYMLINK_HOPS,
  NotAFileError,
  OPAQUE,
  type ReadLayerOptions,
  rootParts,
  streamOf,
  SymlinkLoopError,
  WHITEOUT,
} from "./layers.ts";
import type { TarEntry, TarHeader } from "./tar.ts";
import { MergedTree } from "./view.ts";

/** What one search from the top (or from a hardlink's layer) found. */
type Found =
  | { kind: "file"; header: TarHeader; content: AsyncGenerator<Uint8Array> }
  | { kind: "symlink"; depth: number; linkname: string }
  | { kind: "hardlink"; linkname: string; layer: number }
  | { kind: "missing"; detail?: string }
  | { kind: "other"; type: FileType }
  | { kind: "inexact" };

/**
 * Layers' headers read to their end in one `readFile` call, by layer index; `placed` once they were
 * renamed to where each entry took effect, with the name each carries in its layer.
 */
interface Scanned {
  layers: Map<number, TarHeader[]>;
  placed?: WeakMap<TarHeader, string>;
}

/** A prefix's state so far: undecided, decided by an entry, or deleted by a whiteout. */
type State = TarHeader | "deleted" | undefined;

function isPrefix(parts: string[], of: string[]): boolean {
  return parts.length <= of.length && parts.every((p, i) => p === of[i]);
}

/**
 * Searches `layers[top]` and below for `parts`. A file is handed out as soon as its entry streams by
 * (its content stream ends only after the rest of its layer was read and checked); every other finding
 * is acted on only once the layer holding it has been read to its end and checked.
 */
async function search(
  source: LayerSource,
  image: OpenedImage,
  layers: ImageLayer[],
  parts: string[],
  top: number,
  scanned: Scanned,
  signal: AbortSignal | undefined,
): Promise<Found> {
  const n = parts.length;
  // state[i] is the prefix of length i (1..n).
  const state: State[] = new Array(n + 1).fill(undefined);
  // An opaque directory at depth d hides, in lower layers, every prefix longer than d.
  let visibleDepth = Infinity;
  for (let k = top; k >= 0; k--) {
    const entries: (TarHeader | undefined)[] = new Array(n + 1).fill(undefined);
    const whiteouts: boolean[] = new Array(n + 1).fill(false);
    let opaqueDepth = Infinity;
    // A layer read to its end before (an earlier search of this call) is searched again from memory.
    const known = scanned.layers.get(k);
    const iterator = known === undefined ? layerEntries(source, image, layers[k], { signal }) : undefined;
    const record: TarHeader[] = [];
    // This layer's directories so far, while names are taken as carried.
    const directories = scanned.placed === undefined ? new Set<string>([""]) : undefined;
    let position = 0;
    let finished = false;
    try {
      for (;;) {
        let header: TarHeader;
        let entry: TarEntry | undefined;
        if (known !== undefined) {
          if (position >= known.length) break;
          header = known[position++];
        } else {
          const next = await iterator!.next();
          if (next.done) break;
          entry = next.value;
          header = entry.header;
          record.push(header);
        }
        const names = entryParts(header.name, layers[k].digest);
        const base = names[names.length - 1] ?? "";
        if (directories !== undefined && names.length > 0) {
          if (!directories.has(names.slice(0, -1).join("/"))) {
            finished = true;
            await iterator?.return(undefined);
            return { kind: "inexact" };
          }
          if (header.type === "directory") directories.add(names.join("/"));
        }
        if (base.startsWith(WHITEOUT)) {
          const dir = names.slice(0, -1);
          if (!isPrefix(dir, parts)) continue;
          if (base === OPAQUE) opaqueDepth = Math.min(opaqueDepth, dir.length);
          else if (
            !base.startsWith(`${WHITEOUT}${WHITEOUT}`) && base.slice(WHITEOUT.length) === parts[dir.length]
          ) {
            whiteouts[dir.length + 1] = true;
          }
          continue;
        }
        const i = names.length;
        if (i === 0 || !isPrefix(names, parts) || i > visibleDepth || state[i] !== undefined) continue;
        if (i === n && header.type === "file") {
          finished = true;
          const content = entry === undefined
            ? contentOf(source, image, layers[k], scanned.placed?.get(header) ?? header.name, signal)
            : contentThenRest(entry, iterator!);
          return { kind: "file", header, content };
        }
        entries[i] = header;
      }
      finished = true;
      if (known === undefined) scanned.layers.set(k, record);
    } finally {
      if (!finished) await iterator?.return(undefined);
    }
    for (let i = 1; i <= n; i++) {
      if (state[i] !== undefined || i > visibleDepth) continue;
      if (entries[i] !== undefined) state[i] = entries[i];
      else if (whiteouts[i]) state[i] = "deleted";
    }
    visibleDepth = Math.min(visibleDepth, opaqueDepth);
    const found = decide(state, n, visibleDepth, k);
    if (found !== undefined) return found;
  }
  return { kind: "missing" };
}

/** The content of the entry named `name` in `layer`, fetched again, then the rest of the layer, checked. */
async function* contentOf(
  source: LayerSource,
  image: OpenedImage,
  layer: ImageLayer,
  name: string,
  signal: AbortSignal | undefined,
): AsyncGenerator<Uint8Array> {
  const iterator = layerEntries(source, image, layer, { signal });
  let handedOver = false;
  try {
    for (;;) {
      const next = await iterator.next();
      if (next.done) break;
      if (next.value.header.name !== name || next.value.header.type !== "file") continue;
      handedOver = true;
      yield* contentThenRest(next.value, iterator);
      return;
    }
  } finally {
    if (!handedOver) await iterator.return(undefined);
  }
  throw new LayerError(`Layer ${layer.index} (${layer.digest}) no longer holds "${name}"`, layer.digest);
}

/** What the states decided so far say, or `undefined` when a lower layer must be read. */
function decide(state: State[], n: number, visibleDepth: number, layer: number): Found | undefined {
  for (let i = 1; i <= n; i++) {
    const s = state[i];
    if (s === "deleted") return { kind: "missing" };
    if (s === undefined) {
      // A deeper prefix that some layer holds makes this one a directory of that layer.
      if (state.slice(i + 1).some((t) => t !== undefined)) continue;
      if (i > visibleDepth) return { kind: "missing" };
      return undefined;
    }
    if (s.type === "symlink") return { kind: "symlink", depth: i, linkname: s.linkname };
    if (i < n) {
      if (s.type === "directory") continue;
      return { kind: "missing", detail: "a component of the path is not a directory" };
    }
    if (s.type === "hardlink") return { kind: "hardlink", linkname: s.linkname, layer };
    return { kind: "other", type: fileType(s.type) };
  }
  return undefined;
}

/** The entry's content (copied: the tar reader reuses its buffers), then the rest of its layer, checked. */
async function* contentThenRest(
  entry: TarEntry,
  iterator: AsyncGenerator<TarEntry>,
): AsyncGenerator<Uint8Array> {
  let finished = false;
  try {
    for await (const chunk of entry.content()) yield chunk.slice();
    while (!(await iterator.next()).done) { /* read to the end: the diff id check comes there */ }
    finished = true;
  } finally {
    if (!finished) await iterator.return(undefined);
  }
}

/**
 * The content of the regular file at `path` in `image`'s final file system, as a stream that closes
 * normally only once the layer it came from was read to its end and matched its diff id.
 *
 * @example Reading /etc/os-release
 * ```ts ignore
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { readFile } from "jsr:@cip/containers-image-proxy/inspect";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * console.log(await new Response(await readFile(proxy, img, "/etc/os-release")).text());
 * ```
 *
 * @param proxy the proxy the image was opened on.
 * @param image the opened image.
 * @param path the file, relative to the image root (a leading `/` is allowed).
 * @param options `verifyDiffIds` (default true) and `signal`.
 * @returns the file's bytes.
 * @throws {FileNotFoundError} when nothing is at `path` (or a symlink on the way dangles).
 * @throws {NotAFileError} when `path` is a directory, a device or a FIFO.
 * @throws {SymlinkLoopError} after {@linkcode MAX_SYMLINK_HOPS} symlinks.
 * @throws {DiffIdMismatchError} when a layer read on the way does not match its diff id.
 */
export async function readFile(
  proxy: LayerSource,
  image: OpenedImage,
  path: string,
  options: ReadLayerOptions = {},
): Promise<ReadableStream<Uint8Array>> {
  const { signal } = options;
  const layers = await imageLayers(proxy, image, options);
  let parts = rootParts(path);
  let top = layers.length - 1;
  let hops = 0;
  let scanned: Scanned = { layers: new Map() };
  for (;;) {
    if (parts.length === 0) throw new NotAFileError(path, "dir");
    const found = await search(proxy, image, layers, parts, top, scanned, signal);
    switch (found.kind) {
      case "inexact":
        scanned = await placedHeaders(proxy, image, layers, scanned, signal);
        [parts, top, hops] = [rootParts(path), layers.length - 1, 0];
        continue;
      case "file":
        return streamOf(found.content);
      case "symlink":
        if (++hops > MAX_SYMLINK_HOPS) throw new SymlinkLoopError(path);
        parts = [...rootParts(found.linkname, parts.slice(0, found.depth - 1)), ...parts.slice(found.depth)];
        top = layers.length - 1;
        continue;
      case "hardlink":
        if (++hops > MAX_SYMLINK_HOPS) throw new SymlinkLoopError(path);
        parts = entryParts(found.linkname, layers[found.layer].digest);
        top = found.layer;
        continue;
      case "missing":
        throw new FileNotFoundError(path, found.detail);
      case "other":
        throw new NotAFileError(path, found.type);
    }
  }
}

/**
 * Every layer's headers renamed to where each entry took effect (parent symlinks resolved, as the view
 * places them), reading the layers not yet read.
 */
async function placedHeaders(
  source: LayerSource,
  image: OpenedImage,
  layers: ImageLayer[],
  scanned: Scanned,
  signal: AbortSignal | undefined,
): Promise<Scanned> {
  const tree = new MergedTree();
  const placed: Scanned = { layers: new Map(), placed: new WeakMap() };
  for (const layer of layers) {
    let headers = scanned.layers.get(layer.index);
    if (headers === undefined) {
      headers = [];
      for await (const entry of layerEntries(source, image, layer, { signal })) headers.push(entry.header);
    }
    const renamed: TarHeader[] = [];
    tree.apply(layer, headers, (header, path, target) => {
      const linkname = header.type === "hardlink" && target ? target.join("/") : header.linkname;
      const moved = { ...header, name: path.join("/"), linkname };
      placed.placed!.set(moved, header.name);
      renamed.push(moved);
    });
    placed.layers.set(layer.index, renamed);
  }
  return placed;
}
