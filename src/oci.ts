/**
 * The OCI image-spec types the proxy returns, with the light checks the client applies to them.
 *
 * @module
 */

import { ProtocolError } from "./errors.ts";

/** An OCI content descriptor. */
export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  urls?: string[];
  annotations?: Record<string, string>;
  platform?: Platform;
  artifactType?: string;
}

/** The platform an image or index entry is for. */
export interface Platform {
  architecture: string;
  os: string;
  "os.version"?: string;
  "os.features"?: string[];
  variant?: string;
}

/** An OCI image manifest (the proxy converts Docker schema 2 manifests to this form). */
export interface ImageManifest {
  schemaVersion: 2;
  mediaType?: string;
  artifactType?: string;
  config: Descriptor;
  layers: Descriptor[];
  subject?: Descriptor;
  annotations?: Record<string, string>;
}

/** An OCI image index (used when writing an OCI layout). */
export interface ImageIndex {
  schemaVersion: 2;
  mediaType?: string;
  manifests: Descriptor[];
  annotations?: Record<string, string>;
}

/** The execution parameters of an image configuration (`config` field); what `GetConfig` returns. */
export interface RuntimeConfig {
  User?: string;
  ExposedPorts?: Record<string, Record<string, never>>;
  Env?: string[];
  Entrypoint?: string[] | null;
  Cmd?: string[] | null;
  Volumes?: Record<string, Record<string, never>>;
  WorkingDir?: string;
  Labels?: Record<string, string>;
  StopSignal?: string;
  [key: string]: unknown;
}

/** A full OCI image configuration, as `GetFullConfig` returns it. */
export interface ImageConfiguration {
  created?: string;
  author?: string;
  architecture: string;
  os: string;
  variant?: string;
  config?: RuntimeConfig;
  rootfs: { type: string; diff_ids: string[] };
  history?: {
    created?: string;
    author?: string;
    created_by?: string;
    comment?: string;
    empty_layer?: boolean;
  }[];
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

function isDescriptor(value: unknown): value is Descriptor {
  const d = value as Descriptor;
  return typeof d === "object" && d !== null && typeof d.digest === "string" &&
    typeof d.mediaType === "string" && Number.isSafeInteger(d.size) && d.size >= 0;
}

/** Checks that `value` looks like an image manifest (config and layer descriptors present). */
export function checkManifest(value: unknown): ImageManifest {
  const m = value as ImageManifest;
  if (typeof m !== "object" || m === null || m.schemaVersion !== 2) {
    throw new ProtocolError("Manifest is not an OCI image manifest (schemaVersion 2)");
  }
  if (!isDescriptor(m.config)) throw new ProtocolError("Manifest has no valid config descriptor");
  if (!Array.isArray(m.layers) || !m.layers.every(isDescriptor)) {
    throw new ProtocolError("Manifest has an invalid layers array");
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
  }
  return value as ConvertedLayerInfo[];
}
