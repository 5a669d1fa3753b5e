/**
 * Typed image references: `TRANSPORT:NAME` for every transport containers/image knows, checked here so
 * that a malformed reference fails with a clear error before it reaches skopeo.
 *
 * @module
 */

import { InvalidReferenceError } from "./errors.ts";

/** The transports containers/image understands (plus `registry:`, the ostree spelling of `docker://`). */
export type TransportName =
  | "docker"
  | "registry"
  | "oci"
  | "oci-archive"
  | "docker-archive"
  | "dir"
  | "containers-storage"
  | "docker-daemon";

const TRANSPORTS: ReadonlySet<string> = new Set<TransportName>([
  "docker",
  "registry",
  "oci",
  "oci-archive",
  "docker-archive",
  "dir",
  "containers-storage",
  "docker-daemon",
]);

// The grammar of github.com/distribution/reference, which containers/image uses for docker names.
const ALNUM = "[a-z0-9]+";
const SEPARATOR = "(?:[._]|__|[-]+)";
const PATH_COMPONENT = `${ALNUM}(?:${SEPARATOR}${ALNUM})*`;
const DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const DOMAIN = `(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[0-9a-fA-F:.]+\\])(?::[0-9]+)?`;
const NAME_RE = new RegExp(`^(?:${DOMAIN}/)?${PATH_COMPONENT}(?:/${PATH_COMPONENT})*$`);
const TAG_RE = /^[\w][\w.-]{0,127}$/;
const DIGEST_RE = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$/;
// A Map, not an object literal: an algorithm named "constructor" must not find Object's members.
const KNOWN_DIGESTS: ReadonlyMap<string, RegExp> = new Map([
  ["sha256", /^[a-f0-9]{64}$/],
  ["sha512", /^[a-f0-9]{128}$/],
]);

/**
 * Checks a digest that names content this library verifies or stores under its name: a descriptor from
 * the proxy, a blob file in a layout. Stricter than {@linkcode digestProblem}: the algorithm must be
 * one this library can verify (`sha256`, `sha512`) and the encoding lowercase hex of exactly that
 * algorithm's length, so the digest is always safe as a file name (`blobs/sha256/<hex>`).
 *
 * @param digest the value to check (anything: it often comes from the peer).
 * @returns the reason it is not such a digest (any hostile text in it escaped by JSON quoting), or
 * `undefined`.
 *
 * @example Refusing a digest that would leave a layout folder
 * ```ts
 * import { contentDigestProblem } from "./reference.ts";
 * console.log(contentDigestProblem(`sha256:${"a".repeat(64)}`)); // undefined
 * console.log(contentDigestProblem(`../../outside:${"a".repeat(64)}`)); // the reason
 * ```
 */
export function contentDigestProblem(digest: unknown): string | undefined {
  if (typeof digest !== "string") return "a digest is a string";
  const colon = digest.indexOf(":");
  const shape = colon > 0 ? KNOWN_DIGESTS.get(digest.slice(0, colon)) : undefined;
  if (shape?.test(digest.slice(colon + 1))) return undefined;
  const shown = JSON.stringify(digest.length > 200 ? `${digest.slice(0, 200)}...` : digest);
  return shape
    ? `${shown} is not a valid ${digest.slice(0, colon)} digest (lowercase hex of the algorithm's length)`
    : `${shown} is not a sha256 or sha512 digest`;
}

/** Checks a digest string (`sha256:<64 hex>`); returns the reason it is not one, or `undefined`. */
export function digestProblem(digest: string): string | undefined {
  const colon = digest.indexOf(":");
  const shape = KNOWN_DIGESTS.get(digest.slice(0, colon));
  if (shape) {
    return shape.test(digest.slice(colon + 1))
      ? undefined
      : `"${digest}" is not a valid ${digest.slice(0, colon)} digest`;
  }
  return DIGEST_RE.test(digest) ? undefined : `"${digest}" is not a digest (ALGORITHM:HEX)`;
}

/** Returns the reason `name` is not a docker reference (`[DOMAIN/]PATH[:TAG][@DIGEST]`), or `undefined`. */
function dockerNameProblem(name: string): string | undefined {
  if (name.length === 0) return "the image name is empty";
  if (name.length > 255 + 128 + 140) return "the name is too long";
  let rest = name;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    const problem = digestProblem(digest);
    if (problem) return problem;
  }
  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf("/");
  const colon = rest.lastIndexOf(":");
  if (colon > lastSlash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG_RE.test(tag)) return `"${tag}" is not a valid tag`;
  }
  if (tag !== undefined && digest !== undefined) {
    return "a reference with both a tag and a digest is not supported by containers/image";
  }
  if (!NAME_RE.test(rest)) {
    return `"${rest}" is not a valid repository name (lowercase letters, digits and separators)`;
  }
  if (rest.length > 255) return "the repository name is longer than 255 characters";
  return undefined;
}

function pathProblem(path: string, what: string): string | undefined {
  if (path.length === 0) return `the ${what} path is empty`;
  if (path.includes("\0")) return `the ${what} path contains a NUL byte`;
  return undefined;
}

/** Checks the part after `TRANSPORT:` for one transport; returns the reason it is malformed. */
function nameProblem(transport: TransportName, name: string): string | undefined {
  switch (transport) {
    case "docker":
      if (!name.startsWith("//")) return 'docker references start with "docker://"';
      return dockerNameProblem(name.slice(2));
    case "registry":
      return dockerNameProblem(name);
    case "oci":
    case "oci-archive": {
      // containers/image splits PATH[:REFERENCE] at the first colon.
      const colon = name.indexOf(":");
      const path = colon >= 0 ? name.slice(0, colon) : name;
      const problem = pathProblem(path, transport === "oci" ? "layout" : "archive");
      if (problem) return problem;
      if (colon >= 0) {
        const ref = name.slice(colon + 1);
        if (!/^[a-zA-Z0-9._\/:@+-]+$/.test(ref)) return `"${ref}" is not a valid image name in a layout`;
      }
      return undefined;
    }
    case "docker-archive": {
      const colon = name.indexOf(":");
      const path = colon >= 0 ? name.slice(0, colon) : name;
      const problem = pathProblem(path, "archive");
      if (problem) return problem;
      if (colon < 0) return undefined;
      const ref = name.slice(colon + 1);
      if (ref.startsWith("@")) {
        return /^@[0-9]+$/.test(ref) ? undefined : `"${ref}" is not a valid archive index (@N)`;
      }
      return dockerNameProblem(ref);
    }
    case "dir":
      return pathProblem(name, "directory");
    case "containers-storage": {
      let rest = name;
      if (rest.startsWith("[")) {
        const end = rest.indexOf("]");
        if (end < 0) return "the storage specifier is missing its closing bracket";
        rest = rest.slice(end + 1);
      }
      if (rest.length === 0) return "the image name or id is empty";
      if (/^[a-f0-9]{64}$/.test(rest)) return undefined;
      const at = rest.indexOf("@");
      if (at >= 0 && /^[a-f0-9]{64}$/.test(rest.slice(at + 1))) rest = rest.slice(0, at);
      return dockerNameProblem(rest);
    }
    case "docker-daemon":
      if (name.startsWith("sha256:")) return digestProblem(name);
      return dockerNameProblem(name);
  }
}

/**
 * A parsed `TRANSPORT:NAME` image reference, validated for its transport.
 *
 * @example Parsing and printing a reference
 * ```ts
 * import { ImageReference } from "./reference.ts";
 * const ref = ImageReference.parse("docker://quay.io/fedora/fedora:40");
 * console.log(ref.transport, ref.name, String(ref));
 * ```
 */
export class ImageReference {
  /** The transport, as written before the first colon. */
  readonly transport: TransportName;
  /** Everything after `TRANSPORT:` (for `docker` this keeps the leading `//`). */
  readonly name: string;

  private constructor(transport: TransportName, name: string) {
    this.transport = transport;
    this.name = name;
  }

  /**
   * Parses and validates `reference`.
   *
   * @throws {InvalidReferenceError} when the transport is unknown or the name is malformed for it.
   */
  static parse(reference: string): ImageReference {
    if (typeof reference !== "string") {
      throw new InvalidReferenceError(String(reference), "an image reference is a string");
    }
    const colon = reference.indexOf(":");
    if (colon <= 0) {
      throw new InvalidReferenceError(
        reference,
        'expected TRANSPORT:NAME, such as "docker://quay.io/fedora/fedora:latest" or "oci:/path/to/layout"',
      );
    }
    const transport = reference.slice(0, colon);
    if (!TRANSPORTS.has(transport)) {
      throw new InvalidReferenceError(
        reference,
        `unknown transport "${transport}" (known: ${[...TRANSPORTS].join(", ")})`,
      );
    }
    const name = reference.slice(colon + 1);
    const problem = nameProblem(transport as TransportName, name);
    if (problem) throw new InvalidReferenceError(reference, problem);
    return new ImageReference(transport as TransportName, name);
  }

  /** Builds a reference from its parts, validating them as {@linkcode ImageReference.parse} does. */
  static from(transport: TransportName, name: string): ImageReference {
    return ImageReference.parse(`${transport}:${name}`);
  }

  /** The reference as skopeo takes it: `registry:NAME` becomes `docker://NAME`. */
  toSkopeo(): string {
    return this.transport === "registry" ? `docker://${this.name}` : `${this.transport}:${this.name}`;
  }

  /** The reference as it was written. */
  toString(): string {
    return `${this.transport}:${this.name}`;
  }
}

/** A reference as callers may give it: a string or an already parsed {@linkcode ImageReference}. */
export type ImageReferenceLike = string | ImageReference;

/** Parses `reference` unless it is already an {@linkcode ImageReference}. */
export function toImageReference(reference: ImageReferenceLike): ImageReference {
  return reference instanceof ImageReference ? reference : ImageReference.parse(reference);
}
