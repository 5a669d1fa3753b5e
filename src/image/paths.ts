/**
 * The paths an extraction wrote, as a tree of path components: marking or finding a path costs one
 * step per component, so a layer of deep paths costs time linear in its size, and the tree holds one
 * node per file, directory or link created on disk.
 *
 * @module
 */

/** One path in a {@linkcode WrittenPaths} tree. */
export interface WrittenNode {
  /** The layer (counted by {@linkcode WrittenPaths.nextLayer}) that last wrote it or something inside. */
  layer: number;
  /** What was written inside it, by name. */
  children?: Map<string, WrittenNode>;
}

/**
 * What the layers of one image wrote into the target directory, by real path relative to it. Pass
 * one to every {@linkcode applyLayer} call of an image so that whiteouts remove only what earlier
 * layers wrote, never what the directory held before.
 *
 * @example Applying two layers of one image
 * ```ts ignore
 * import { applyLayer, WrittenPaths } from "jsr:@cip/containers-image-proxy/extract";
 * const writtenPaths = new WrittenPaths();
 * await applyLayer(lower, "./rootfs", { writtenPaths });
 * await applyLayer(upper, "./rootfs", { writtenPaths }); // its whiteouts only reach `lower`'s paths
 * ```
 */
export class WrittenPaths {
  #root: WrittenNode = { layer: -1 };
  #layer = -1;

  /** The layer now being applied (-1 before the first). */
  get layer(): number {
    return this.#layer;
  }

  /**
   * Starts the next layer.
   *
   * @returns its number, from 0.
   */
  nextLayer(): number {
    return ++this.#layer;
  }

  /** Records `parts` and every ancestor as written by the current layer. */
  mark(parts: readonly string[]): void {
    let node = this.#root;
    node.layer = this.#layer;
    for (const part of parts) {
      node.children ??= new Map();
      let child = node.children.get(part);
      if (child === undefined) {
        child = { layer: this.#layer };
        node.children.set(part, child);
      } else child.layer = this.#layer;
      node = child;
    }
  }

  /**
   * The node of `parts`.
   *
   * @returns the node, or `undefined` when no layer wrote that path.
   */
  get(parts: readonly string[]): WrittenNode | undefined {
    let node: WrittenNode | undefined = this.#root;
    for (const part of parts) {
      node = node.children?.get(part);
      if (node === undefined) return undefined;
    }
    return node;
  }

  /** Forgets `parts` and everything under it (it was removed from disk). */
  delete(parts: readonly string[]): void {
    if (parts.length === 0) return;
    this.get(parts.slice(0, -1))?.children?.delete(parts[parts.length - 1]);
  }
}
