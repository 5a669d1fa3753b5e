/**
 * The merged file view of an image: its final file system as a container sees it, read from the layers
 * without unpacking anything. Whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`) hide what
 * lower layers put there, a later entry replaces an earlier one of another type (a directory by a file
 * or a symlink, a file by a directory), and no whiteout marker ever shows. Parent directories are
 * resolved through symlinks inside the root, the way `extractImage` resolves them on disk, so the view
 * and an extraction of the same image agree.
 *
 * Memory: one small record per path of the final file system, plus the headers of the layer being read
 * (a layer's entries are applied only once its diff id has been checked). No file content is held.
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
  OPAQUE,
  type ReadLayerOptions,
  rootParts,
  WHITEOUT,
} from "./layers.ts";
import type { TarHeader } from "./tar.ts";

/** One path of the image's final file system. */
export interface FileEntry {
  /** The path relative to the root, without a leading `/` (`etc/os-release`). */
  path: string;
  /** What it is. A `hardlink` names the path holding the same file (`linkname`). */
  type: FileType;
  /** Permission bits, setuid, setgid and sticky included. */
  mode: number;
  /** The owner's numeric id. */
  uid: number;
  /** The group's numeric id. */
  gid: number;
  /** Content size in bytes for files; 0 for everything else, hardlinks included (as tar lists them). */
  size: number;
  /** Modification time, seconds since the epoch. */
  mtime: number;
  /** A symlink's target as stored, or the path a hardlink shares its file with; empty otherwise. */
  linkname: string;
  /** Device numbers of `char` and `block` entries. */
  devmajor: number;
  /** Device numbers of `char` and `block` entries. */
  devminor: number;
  /** The index of the layer the entry comes from, from 0 (the bottom layer). */
  layer: number;
  /** The digest of that layer's blob. */
  layerDigest: string;
}

/** Options for {@linkcode listImage} and {@linkcode findInImage}. */
export interface ViewOptions extends ReadLayerOptions {
  /** List only this path and what lies below it (relative to the root; a leading `/` is allowed). */
  path?: string;
}

/** The identity of a regular file's content, shared by its hardlinks. */
interface Inode {
  /** The node that brought the content (it names the file when it survives). */
  origin: Node;
}

/** A path in the tree being built. */
interface Node {
  entry: Omit<FileEntry, "path">;
  children?: Map<string, Node>;
  inode?: Inode;
}

function directoryEntry(layer: ImageLayer): Omit<FileEntry, "path"> {
  return {
    type: "dir",
    mode: 0o755,
    uid: 0,
    gid: 0,
    size: 0,
    mtime: 0,
    linkname: "",
    devmajor: 0,
    devminor: 0,
    layer: layer.index,
    layerDigest: layer.digest,
  };
}

function entryOf(header: TarHeader, layer: ImageLayer): Omit<FileEntry, "path"> {
  return {
    type: fileType(header.type),
    mode: header.mode,
    uid: header.uid,
    gid: header.gid,
    size: header.type === "file" ? header.size : 0,
    mtime: header.mtime,
    linkname: header.linkname,
    devmajor: header.devmajor,
    devminor: header.devminor,
    layer: layer.index,
    layerDigest: layer.digest,
  };
}

/** Where an entry took effect: its path and, for a hardlink, its target's (parent symlinks resolved). */
export type Placed = (header: TarHeader, path: string[], target?: string[] | null) => void;

/**
 * The final file system, built layer by layer in memory (metadata only). Exposed for the other readers
 * of this folder; not part of the public API.
 */
export class MergedTree {
  readonly root: Node;

  constructor() {
    this.root = {
      entry: { ...directoryEntry({ index: -1, digest: "", size: 0, diffId: undefined }) },
    };
    this.root.children = new Map();
  }

  /**
   * The directory node `parts` names, symlinks followed inside the root. With `create`, missing
   * directories are made (as extraction makes them); without, a missing one yields `null`.
   */
  directory(parts: string[], name: string, create: ImageLayer | null): Node | null {
    return this.#resolve(parts, name, create, { left: MAX_SYMLINK_HOPS })?.node ?? null;
  }

  /** {@linkcode MergedTree.directory}, with the real path it reached (relative symlinks start there). */
  #resolve(
    parts: string[],
    name: string,
    create: ImageLayer | null,
    hops: { left: number },
  ): { node: Node; real: string[] } | null {
    let current = this.root;
    let real: string[] = [];
    for (const part of parts) {
      let next = current.children!.get(part);
      if (next === undefined) {
        if (create === null) return null;
        next = { entry: directoryEntry(create), children: new Map() };
        current.children!.set(part, next);
      }
      if (next.entry.type === "symlink") {
        if (--hops.left < 0) {
          throw new LayerError(`Cannot resolve the parent of "${name}": too many symlinks`);
        }
        const target = this.#resolve(rootParts(next.entry.linkname, real), name, null, hops);
        if (target === null) {
          if (create === null) return null;
          throw new LayerError(
            `Cannot create layer entry "${name}": "${part}" is a symlink that does not resolve`,
          );
        }
        ({ node: current, real } = target);
        continue;
      }
      if (next.children === undefined) {
        if (create === null) return null;
        throw new LayerError(
          `Cannot create layer entry "${name}": "${[...real, part].join("/")}" is not a directory`,
        );
      }
      current = next;
      real = [...real, part];
    }
    return { node: current, real };
  }

  /**
   * Applies one layer's entries (already checked against the layer's diff id). `placed`, when given,
   * hears where each entry took effect: its path and, for a hardlink, its target's, with parent
   * symlinks resolved (an entry `lib/x` over a symlink `lib -> usr/lib` is placed at `usr/lib/x`).
   */
  apply(layer: ImageLayer, headers: TarHeader[], placed?: Placed): void {
    const additions: [TarHeader, string[]][] = [];
    for (const header of headers) {
      const parts = entryParts(header.name, layer.digest);
      if (parts.length === 0) continue; // The root itself ("./").
      const base = parts[parts.length - 1];
      if (!base.startsWith(WHITEOUT)) {
        additions.push([header, parts]);
        continue;
      }
      // Whiteouts hide what lower layers put there, never this layer's own entries: applying all of them
      // before this layer's additions gives exactly that.
      const resolved = this.#resolve(parts.slice(0, -1), header.name, null, { left: MAX_SYMLINK_HOPS });
      if (resolved === null) continue;
      const parent = resolved.node;
      placed?.(header, [...resolved.real, base]);
      if (base === OPAQUE) parent.children!.clear();
      else if (!base.startsWith(`${WHITEOUT}${WHITEOUT}`)) {
        parent.children!.delete(base.slice(WHITEOUT.length));
      }
    }
    for (const [header, parts] of additions) this.#add(layer, header, parts, placed);
  }

  #add(layer: ImageLayer, header: TarHeader, parts: string[], placed: Placed | undefined): void {
    const name = parts[parts.length - 1];
    const { node: parent, real } = this.#resolve(parts.slice(0, -1), header.name, layer, {
      left: MAX_SYMLINK_HOPS,
    })!;
    const targetParts = header.type === "hardlink" ? entryParts(header.linkname, layer.digest) : [];
    const targetParent = targetParts.length === 0
      ? null
      : this.#resolve(targetParts.slice(0, -1), header.name, null, { left: MAX_SYMLINK_HOPS });
    placed?.(
      header,
      [...real, name],
      targetParent && [...targetParent.real, targetParts[targetParts.length - 1]],
    );
    const existing = parent.children!.get(name);
    const entry = entryOf(header, layer);
    const node: Node = { entry };
    if (header.type === "directory") {
      if (existing?.children !== undefined) {
        existing.entry = entry;
        return;
      }
      node.children = new Map();
    } else if (header.type === "file") {
      node.inode = { origin: node };
    } else if (header.type === "hardlink") {
      const target = targetParent?.node.children?.get(targetParts[targetParts.length - 1]);
      if (target === undefined) {
        throw new LayerError(
          `Cannot create hardlink "${header.name}": its target "${header.linkname}" does not exist`,
        );
      }
      if (target.children !== undefined) {
        throw new LayerError(
          `Cannot create hardlink "${header.name}": its target "${header.linkname}" is a directory`,
        );
      }
      if (target === existing) return; // A hardlink to itself.
      if (target.inode === undefined) {
        // A hardlink to a symlink or a device is a second copy of it.
        parent.children!.set(name, {
          ...target,
          entry: { ...target.entry, layer: layer.index, layerDigest: layer.digest },
        });
        return;
      }
      node.inode = target.inode;
    }
    parent.children!.set(name, node);
  }

  /**
   * Every node below `start` (itself included unless it is the root), depth first, children sorted by
   * name, with hardlinks settled: among the surviving names of one file, the original holds the content
   * when it survived, else the first name met; every other name is a `hardlink` to it.
   */
  *walk(start: string[] = []): Generator<{ path: string; node: Node; entry: FileEntry }> {
    const holders = new Map<Inode, string>();
    for (const { path, node } of this.#nodes([], this.root)) {
      if (node.inode === undefined) continue;
      if (node.inode.origin === node || !holders.has(node.inode)) holders.set(node.inode, path);
    }
    const top = this.#lookup(start);
    if (top === null) return;
    const nodes = start.length === 0
      ? this.#nodes([], top)
      : [{ path: start.join("/"), node: top }, ...this.#nodes(start, top)];
    for (const { path, node } of nodes) {
      const entry: FileEntry = { path, ...node.entry };
      if (node.inode !== undefined) {
        const holder = holders.get(node.inode)!;
        entry.type = holder === path ? "file" : "hardlink";
        entry.linkname = holder === path ? "" : holder;
        entry.size = holder === path ? node.inode.origin.entry.size : 0;
      }
      yield { path, node, entry };
    }
  }

  #lookup(parts: string[]): Node | null {
    let current: Node | undefined = this.root;
    for (const part of parts) {
      current = current?.children?.get(part);
      if (current === undefined) return null;
    }
    return current;
  }

  *#nodes(prefix: string[], dir: Node): Generator<{ path: string; node: Node }> {
    if (dir.children === undefined) return;
    const names = [...dir.children.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    for (const name of names) {
      const node = dir.children.get(name)!;
      const parts = [...prefix, name];
      yield { path: parts.join("/"), node };
      yield* this.#nodes(parts, node);
    }
  }
}

/**
 * Reads every layer (each once, bottom first) and returns the merged tree. A layer's entries are
 * applied only after its diff id matched.
 */
export async function mergedTree(
  proxy: LayerSource,
  image: OpenedImage,
  options: ReadLayerOptions = {},
): Promise<MergedTree> {
  const tree = new MergedTree();
  for (const layer of await imageLayers(proxy, image, options)) {
    const headers: TarHeader[] = [];
    for await (const entry of layerEntries(proxy, image, layer, options)) headers.push(entry.header);
    tree.apply(layer, headers);
  }
  return tree;
}

/**
 * The image's final file system, one entry per path, depth first with names sorted. Every layer is
 * read (and its diff id checked) before the first entry is yielded, so a layer that fails its check
 * fails the iteration and no entry of a wrong layer is ever seen.
 *
 * @example Listing an image's /etc
 * ```ts ignore
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { listImage } from "jsr:@cip/containers-image-proxy/inspect";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * for await (const entry of listImage(proxy, img, { path: "etc" })) {
 *   console.log(entry.type, entry.path, entry.size, `layer ${entry.layer}`);
 * }
 * ```
 *
 * @param proxy the proxy the image was opened on.
 * @param image the opened image.
 * @param options `path` to list a subtree; `verifyDiffIds` (default true); `signal`.
 * @returns the entries, as an async iterator.
 * @throws {DiffIdMismatchError} when a layer's content does not match its diff id.
 * @throws {FileNotFoundError} when `path` is given and nothing is there.
 * @throws {LayerError} for a malformed layer; `UnsafeEntryError` for an entry naming a path outside the root.
 */
export async function* listImage(
  proxy: LayerSource,
  image: OpenedImage,
  options: ViewOptions = {},
): AsyncGenerator<FileEntry> {
  const tree = await mergedTree(proxy, image, options);
  const start = options.path === undefined ? [] : rootParts(options.path);
  let found = false;
  for (const { entry } of tree.walk(start)) {
    found = true;
    yield entry;
  }
  if (!found && start.length > 0) throw new FileNotFoundError(options.path!);
}

/**
 * The entries of the merged view for which `predicate` is true (see {@linkcode listImage}).
 *
 * @example Finding setuid programs
 * ```ts ignore
 * import { findInImage } from "jsr:@cip/containers-image-proxy/inspect";
 * for await (const e of findInImage(proxy, img, (e) => e.type === "file" && (e.mode & 0o4000) !== 0)) {
 *   console.log(e.path);
 * }
 * ```
 *
 * @param predicate called once per entry.
 * @returns the matching entries, as an async iterator.
 */
export async function* findInImage(
  proxy: LayerSource,
  image: OpenedImage,
  predicate: (entry: FileEntry) => boolean,
  options: ViewOptions = {},
): AsyncGenerator<FileEntry> {
  for await (const entry of listImage(proxy, image, options)) if (predicate(entry)) yield entry;
}
