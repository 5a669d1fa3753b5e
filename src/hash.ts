/**
 * Incremental digests for client-side verification of raw blobs.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { Hasher } from "./transport.ts";

/**
 * A hasher for `algorithm`: the transport's own when it offers one, else `node:crypto`'s, which
 * Deno, Bun and Node all provide.
 *
 * @param algorithm The digest algorithm as a digest names it (`"sha256"`, `"sha512"`).
 * @param native The transport's `createHasher`, if it has one.
 * @returns The hasher, or `undefined` for an algorithm neither knows.
 */
export function createHasher(
  algorithm: string,
  native?: (algorithm: string) => Hasher | undefined,
): Hasher | undefined {
  const own = native?.(algorithm);
  if (own) return own;
  if (algorithm !== "sha256" && algorithm !== "sha512") return undefined;
  const hash = createHash(algorithm);
  return {
    update: (data) => void hash.update(data),
    hexDigest: () => hash.digest("hex"),
  };
}
