/**
 * The OCI image-spec types the proxy returns, with the light checks the client applies to them.
 *
 * @module
 */

import { ProtocolError } from "./errors.ts";
import { contentDigestProblem } from "./reference.ts";

/** An OCI content descriptor. */
export interface Descriptor {
  /** The media type of the referenced content. */
  mediaType: string;
  /** The content's digest (`sha256:<hex>`). */
  digest: string;
  /** The content's size in bytes. */
  size: number;
  /** Other places the content may be downloaded from. */
  urls?: string[];
  /** Arbitrary metadata. */
  annotations?: Record<string, string>;
  /** The platform of a manifest referenced from an index. */
  platform?: Platform;
  /** The artifact type of an artifact manifest. */
  artifactType?: string;
}

/** The platform an image or index entry is for. */
export interface Platform {
  /** CPU architecture (`amd64`, `arm64`, ...). */
  architecture: string;
  /** Operating system (`linux`, ...). */
  os: string;
  /** Operating system version (Windows). */
  "os.version"?: string;
  /** Required operating system features. */
  "os.features"?: string[];
  /** CPU variant (`v8`, ...). */
  variant?: string;
}

/** An OCI image manifest (the proxy converts Docker schema 2 manifests to this form). */
export interface ImageManifest {
  /** Always 2. */
  schemaVersion: 2;
  /** `application/vnd.oci.image.manifest.v1+json` when present. */
  mediaType?: string;
  /** The artifact type, for artifacts. */
  artifactType?: string;
  /** The image configuration blob. */
  config: Descriptor;
  /** The layer blobs, base first. */
  layers: Descriptor[];
  /** The manifest this one refers to (referrers API). */
  subject?: Descriptor;
  /** Arbitrary metadata. */
  annotations?: Record<string, string>;
}

/** An OCI image index (used when writing an OCI layout). */
export interface ImageIndex {
  /** Always 2. */
  schemaVersion: 2;
  /** `application/vnd.oci.image.index.v1+json` when present. */
  mediaType?: string;
  /** The manifests the index lists. */
  manifests: Descriptor[];
  /** Arbitrary metadata. */
  annotations?: Record<string, string>;
}

/** The execution parameters of an image configuration (`config` field); what `GetConfig` returns. */
export interface RuntimeConfig {
  /** User (and group) the process runs as. */
  User?: string;
  /** Ports to expose, as `"80/tcp": {}`. */
  ExposedPorts?: Record<string, Record<string, never>>;
  /** Environment, as `NAME=value`. */
  Env?: string[];
  /** The entrypoint command. */
  Entrypoint?: string[] | null;
  /** Default arguments. */
  Cmd?: string[] | null;
  /** Volume mount points, as `"/data": {}`. */
  Volumes?: Record<string, Record<string, never>>;
  /** Working directory. */
  WorkingDir?: string;
  /** Labels. */
  Labels?: Record<string, string>;
  /** The signal that stops the container. */
  StopSignal?: string;
  /** Fields this type does not name. */
  [key: string]: unknown;
}

/** One entry of an image configuration's history. */
export interface HistoryEntry {
  /** When the layer was created. */
  created?: string;
  /** Who created it. */
  author?: string;
  /** The command that created it. */
  created_by?: string;
  /** A comment. */
  comment?: string;
  /** Whether the step created no layer. */
  empty_layer?: boolean;
}

/** A full OCI image configuration, as `GetFullConfig` returns it. */
export interface ImageConfiguration {
  /** When the image was created. */
  created?: string;
  /** Who created it. */
  author?: string;
  /** CPU architecture. */
  architecture: string;
  /** Operating system. */
  os: string;
  /** CPU variant. */
  variant?: string;
  /** Execution parameters. */
  config?: RuntimeConfig;
  /** The uncompressed layer digests (`diff_ids`), base first. */
  rootfs: { type: string; diff_ids: string[] };
  /** How each layer was made. */
  history?: HistoryEntry[];
  /** Fields this type does not name. */
  [key: string]: unknown;
}

/** One layer as `GetLayerInfo` describes it: the digest and size to fetch it with. */
export interface ConvertedLayerInfo {
  /** The digest to pass to `getBlob`. */
  digest: string;
  /** The size in bytes (-1 when the transport does not know it). */
  size: number;
  /** The layer's media type. */
  media_type: string;
}

/**
 * Checks a digest the proxy sent before anything uses it: as a blob's file name, in a request, in a
 * message. Only `sha256` and `sha512` digests in lowercase hex of the right length pass (see
 * {@linkcode contentDigestProblem}).
 *
 * @param value the digest as received.
 * @param what what the digest is, for the message ("The digest GetManifest returned").
 * @returns `value`, known to be a valid digest.
 * @throws {ProtocolError} when it is not one.
 */
export function checkContentDigest(value: unknown, what: string): string {
  const problem = contentDigestProblem(value);
  if (problem) throw new ProtocolError(`${what} is invalid: ${problem}`);
  return value as string;
}

function isDescriptor(value: unknown): value is Descriptor {
  const d = value as Descriptor;
  return typeof d === "object" && d !== null && typeof d.digest === "string" &&
    typeof d.mediaType === "string" && Number.isSafeInteger(d.size) && d.size >= 0;
}

/**
 * Checks that `value` looks like an image manifest: config and layer descriptors present, each with a
 * digest that is safe to fetch and to store under its name.
 */
export function checkManifest(value: unknown): ImageManifest {
  const m = value as ImageManifest;
  if (typeof m !== "object" || m === null || m.schemaVersion !== 2) {
    throw new ProtocolError("Manifest is not an OCI image manifest (schemaVersion 2)");
  }
  if (!isDescriptor(m.config)) throw new ProtocolError("Manifest has no valid config descriptor");
  if (!Array.isArray(m.layers) || !m.layers.every(isDescriptor)) {
    throw new ProtocolError("Manifest has an invalid layers array");
  }
  checkContentDigest(m.config.digest, "The manifest's config digest");
  for (const [i, layer] of m.layers.entries()) {
    checkContentDigest(layer.digest, `The manifest's layer ${i} digest`);
  }
  return m;
}

/** Checks that `value` looks like an image configuration. */
export function checkConfiguration(value: unknown): ImageConfiguration {
  const c = value as ImageConfiguration;
  if (typeof c !== "object" || c === null || Array.isArray(c)) {
    throw new ProtocolError("Image configuration is not a JSON object");
  }
  return c;
}

/** Checks a `GetLayerInfo` array. */
export function checkLayerInfo(value: unknown): ConvertedLayerInfo[] {
  if (!Array.isArray(value)) throw new ProtocolError("Layer info is not an array");
  for (const [i, layer] of value.entries()) {
    const l = layer as ConvertedLayerInfo;
    if (
      typeof l !== "object" || l === null || typeof l.digest !== "string" ||
      !Number.isSafeInteger(l.size) || l.size < -1 || typeof l.media_type !== "string"
    ) {
      throw new ProtocolError(`Layer info entry ${i} is malformed: ${JSON.stringify(layer)}`);
    }
    checkContentDigest(l.digest, `Layer info entry ${i}'s digest`);
  }
  return value as ConvertedLayerInfo[];
}
