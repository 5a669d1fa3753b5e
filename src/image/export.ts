/**
 * The flattened file system of an image as one tar (what `crane export` gives), streamed while the
 * layers are read: each path once, from the layer that wins; no whiteout or opaque marker left; modes,
 * owners, times and symlinks as the winning entry has them; PAX headers where ustar fields are too short.
 *
 * How it reads each layer once: layers are read from the top down, so the first entry met for a path
 * is the one that wins, and it can be written at once, content and all. What upper layers decided is
 * remembered per path (written as a directory, written as something else, deleted by a whiteout) along
 * with the directories they made opaque, and an entry of a lower layer is written only when neither its
 * path nor any parent was decided against it. The archive therefore lists upper layers first, and a
 * directory's content may be spread over the archive.
 *
 * Directory entries are written last, once every file is in the archive, each after the directories
 * in it. The entry that wins is not known before the lowest layer holding the directory is read, so
 * parents cannot come first; and a directory written among the files gets a later file's time from
 * GNU tar, which sets a directory's time once the archive leaves it and not again when the archive
 * comes back to it (39 of the 88 directories of a Debian test image). At the end, every reader sets
 * them as the archive says, and GNU tar, bsdtar and Python's tarfile create the parents they meet
 * first.
 *
 * Hardlinks are kept when their target survives and become regular files otherwise. A link to a file of
 * its own layer that an upper layer shadows needs bytes that went by earlier in that layer: shadowed
 * files are therefore copied to a temporary folder while their layer is read, and dropped at its end.
 * A link to a file of a lower layer waits for that layer.
 *
 * Cost: memory of one small record per path of the final file system (plus the paths whiteouts
 * deleted) and the headers of its directories; temporary disk space up to the size of the files one layer holds that upper layers shadow.
 * A layer whose content does not match its diff id errors the stream at that layer's end, so a stream
 * that closes normally was checked throughout.
 *
 * @module
 */

import { mkdtemp, open, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { OpenedImage } from "../proxy.ts";
import { LayerError } from "./extract.ts";
import {
  entryParts,
  imageLayers,
  layerEntries,
  type LayerSource,
  OPAQUE,
  type ReadLayerOptions,
  streamOf,
  WHITEOUT,
} from "./layers.ts";
import type { TarEntry, TarHeader } from "./tar.ts";
import { END_OF_ARCHIVE, padding, sparseMapBlocks, storedSize, tarHeaderBlocks } from "./tar-write.ts";

/** Options for {@linkcode exportImage}. */
export interface ExportOptions extends ReadLayerOptions {
  /** Where shadowed files of the layer being read are kept for hardlinks (default: the temp folder). */
  spillDirectory?: string;
}

/** What an upper layer decided for a path. */
type Decision = "dir" | "other" | "deleted";

/** What this layer had at a path, for the hardlinks that come after it. */
type Seen =
  | { kind: "written"; as: string }
  | { kind: "spilled"; file: string; header: TarHeader }
  | { kind: "hidden"; header: TarHeader };

/** Shadowed files of one layer, kept on disk until the layer ends. */
class Spill {
  readonly #parent: string;
  #dir: string | undefined;
  #count = 0;

  constructor(parent: string) {
    this.#parent = parent;
  }

  /** Keeps the entry's stored data (a sparse file's segments at their offsets, holes left as holes). */
  async save(entry: TarEntry): Promise<string> {
    this.#dir ??= await mkdtemp(join(this.#parent, "cip-export-"));
    const file = join(this.#dir, String(this.#count++));
    const handle = await open(file, "wx", 0o600);
    try {
      for await (const { offset: at, data } of entry.segments()) {
        let offset = 0;
        while (offset < data.length) {
          offset += (await handle.write(data, offset, data.length - offset, at + offset)).bytesWritten;
        }
      }
    } finally {
      await handle.close();
    }
    return file;
  }

  /** The stored data of what {@linkcode Spill.save} kept for `header`, as {@linkcode stored} hands it. */
  async *read(file: string, header: TarHeader): AsyncGenerator<Uint8Array> {
    const handle = await open(file, "r");
    try {
      for (const segment of header.sparse ?? [{ offset: 0, length: header.size }]) {
        for (let done = 0; done < segment.length;) {
          const buffer = new Uint8Array(Math.min(1 << 16, segment.length - done));
          const { bytesRead } = await handle.read(buffer, 0, buffer.length, segment.offset + done);
          if (bytesRead === 0) return;
          done += bytesRead;
          yield buffer.subarray(0, bytesRead);
        }
      }
    } finally {
      await handle.close();
    }
  }

  async clear(): Promise<void> {
    if (this.#dir !== undefined) await rm(this.#dir, { recursive: true, force: true });
    this.#dir = undefined;
  }
}

/** The flattening state: what upper layers decided, and hardlinks waiting for a lower layer. */
class Flattener {
  readonly decided = new Map<string, Decision>();
  readonly opaque = new Set<string>();
  /** Target path -> the hardlinks (already named by their own path) waiting for it. */
  readonly waiting = new Map<string, TarHeader[]>();

  visible(parts: string[]): boolean {
    if (this.decided.has(parts.join("/")) || this.opaque.has("")) return false;
    for (let i = 1; i < parts.length; i++) {
      const parent = parts.slice(0, i).join("/");
      const decision = this.decided.get(parent);
      if (decision === "deleted" || decision === "other" || this.opaque.has(parent)) return false;
    }
    return true;
  }
}

/** A regular file's header for `header` (a hardlink that holds the bytes), as `content` describes them. */
function file(header: TarHeader, content: TarHeader): Uint8Array {
  return tarHeaderBlocks({
    ...header,
    type: "file",
    size: content.size,
    sparse: content.sparse,
    linkname: "",
  });
}

function link(header: TarHeader, target: string): Uint8Array {
  return tarHeaderBlocks({ ...header, type: "hardlink", size: 0, linkname: target });
}

/**
 * A file entry's data as the archive stores it: the content, or for a sparse file its map, then its
 * data segments (holes stay out of the export as they were out of the layer), then the padding.
 */
async function* stored(header: TarHeader, chunks: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  const size = storedSize(header);
  let written = 0;
  if (header.sparse !== undefined) {
    const map = sparseMapBlocks(header.sparse);
    written += map.length;
    yield map;
  }
  for await (const chunk of chunks) {
    written += chunk.length;
    yield chunk.slice(); // The tar reader's buffers are its own.
  }
  if (written !== size) throw new LayerError(`Export: a file's content has ${written} bytes, not ${size}`);
  if (padding(size) > 0) yield new Uint8Array(padding(size));
}

/** The stored data of a file entry, read from the layer. */
async function* storedData(entry: TarEntry): AsyncGenerator<Uint8Array> {
  for await (const { data } of entry.segments()) yield data;
}

async function* flatten(
  proxy: LayerSource,
  image: OpenedImage,
  options: ExportOptions,
): AsyncGenerator<Uint8Array> {
  const { signal } = options;
  const layers = await imageLayers(proxy, image, options);
  const state = new Flattener();
  const spill = new Spill(options.spillDirectory ?? tmpdir());
  const directories: TarHeader[] = [];
  try {
    for (let k = layers.length - 1; k >= 0; k--) {
      const layer = layers[k];
      const seen = new Map<string, Seen>();
      const whiteouts: string[] = [];
      const opaques: string[] = [];
      for await (const entry of layerEntries(proxy, image, layer, { signal })) {
        const parts = entryParts(entry.header.name, layer.digest);
        if (parts.length === 0) continue; // The root itself.
        const base = parts[parts.length - 1];
        if (base.startsWith(WHITEOUT)) {
          // Whiteouts hide lower layers only: they take effect once this layer is done.
          const dir = parts.slice(0, -1).join("/");
          if (base === OPAQUE) opaques.push(dir);
          else if (!base.startsWith(`${WHITEOUT}${WHITEOUT}`)) {
            whiteouts.push([...parts.slice(0, -1), base.slice(WHITEOUT.length)].join("/"));
          }
          continue;
        }
        const path = parts.join("/");
        const header: TarHeader = { ...entry.header, name: path };
        const visible = state.visible(parts);
        if (visible) state.decided.set(path, header.type === "directory" ? "dir" : "other");
        if (header.type === "hardlink") {
          if (!visible) continue;
          const target = entryParts(header.linkname, layer.digest).join("/");
          const before = seen.get(target);
          if (before?.kind === "written") yield link(header, before.as);
          else if (before?.kind === "spilled") {
            yield file(header, before.header);
            yield* stored(before.header, spill.read(before.file, before.header));
            seen.set(target, { kind: "written", as: path });
          } else if (before?.kind === "hidden") {
            yield tarHeaderBlocks({ ...before.header, name: path });
          } else {
            state.waiting.set(target, [...(state.waiting.get(target) ?? []), header]);
          }
          continue;
        }
        const waiting = state.waiting.get(path) ?? [];
        state.waiting.delete(path);
        if (visible) {
          if (header.type === "directory") directories.push(header);
          else yield tarHeaderBlocks(header);
          if (header.type === "file") yield* stored(header, storedData(entry));
          seen.set(path, { kind: "written", as: path });
          for (const w of waiting) yield link(w, path);
        } else if (header.type === "file" && waiting.length > 0) {
          // Hardlinks from upper layers to a file that did not survive: the first one holds its bytes.
          const [first, ...rest] = waiting;
          yield file(first, header);
          yield* stored(header, storedData(entry));
          seen.set(path, { kind: "written", as: first.name });
          for (const w of rest) yield link(w, first.name);
        } else if (header.type === "file") {
          seen.set(path, { kind: "spilled", file: await spill.save(entry), header });
        } else {
          for (const w of waiting) yield tarHeaderBlocks({ ...header, name: w.name });
          if (header.type !== "directory") seen.set(path, { kind: "hidden", header });
        }
      }
      for (const path of whiteouts) if (!state.decided.has(path)) state.decided.set(path, "deleted");
      for (const dir of opaques) state.opaque.add(dir);
      await spill.clear();
    }
    for (const [target, links] of state.waiting) {
      throw new LayerError(
        `Cannot export hardlink "${links[0].name}": its target "${target}" does not exist`,
      );
    }
    // Children before their parents: making an empty directory changes its parent's time.
    directories.sort((a, b) => a.name < b.name ? 1 : a.name > b.name ? -1 : 0);
    for (const header of directories) yield tarHeaderBlocks(header);
    yield END_OF_ARCHIVE;
  } finally {
    await spill.clear();
  }
}

/**
 * The image's final file system as one tar stream (see the module documentation for how and at what
 * cost). The stream errors if a layer fails its diff id check, a blob fails verification or a layer is
 * malformed; it closes normally only when every layer was read and checked.
 *
 * @example Writing an image's file system to a tar file
 * ```ts ignore
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { exportImage } from "jsr:@cip/containers-image-proxy/inspect";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * const file = await Deno.open("rootfs.tar", { write: true, create: true, truncate: true });
 * await exportImage(proxy, img).pipeTo(file.writable);
 * ```
 *
 * @param proxy the proxy the image was opened on.
 * @param image the opened image.
 * @param options `verifyDiffIds` (default true), `signal`, `spillDirectory`.
 * @returns the tar bytes.
 */
export function exportImage(
  proxy: LayerSource,
  image: OpenedImage,
  options: ExportOptions = {},
): ReadableStream<Uint8Array> {
  return streamOf(flatten(proxy, image, options));
}
