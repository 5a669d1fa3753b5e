/**
 * Fetch container images from Deno, Bun and Node through skopeo's `experimental-image-proxy`: every
 * transport, mirror, auth file and signature policy containers/image supports, with manifests,
 * configurations and layers streamed as Web `ReadableStream`s.
 *
 * @example Streaming a layer from an OCI layout
 * ```ts
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("oci:/var/lib/images/app:latest");
 * const { manifest } = await proxy.fetchManifest(img);
 * for (const layer of manifest.layers) {
 *   const { stream } = await proxy.getDescriptor(img, layer);
 *   await stream.pipeTo(new WritableStream()); // verified once it closes
 * }
 * ```
 *
 * @module
 * @tags allow-ffi, allow-run, allow-env
 */

export { ImageProxy, OpenedImage } from "./src/proxy.ts";
export type { BlobOptions, BlobReader, RawBlobOptions, SaveBlobOptions } from "./src/proxy.ts";
export { DEFAULT_BLOB_IDLE_TIMEOUT_MS, DEFAULT_SKOPEO_CMD, skopeoArgv } from "./src/config.ts";
export type { ImageProxyConfig, RetryPolicy } from "./src/config.ts";
export {
  BlobError,
  ConfigurationError,
  describeExit,
  ImageProxyError,
  InvalidReferenceError,
  LayoutError,
  ProtocolError,
  ProxyClosedError,
  ProxyExitedError,
  ProxyTooOldError,
  RequestError,
  RequestTimeoutError,
  SpawnError,
  UnsupportedMethodError,
} from "./src/errors.ts";
export type { ExitStatus, ProxyErrorCode } from "./src/errors.ts";
export { contentDigestProblem, digestProblem, ImageReference, toImageReference } from "./src/reference.ts";
export type { ImageReferenceLike, TransportName } from "./src/reference.ts";
export { BASE_PROTOCOL_VERSION, MAX_REQUEST_SIZE, METHOD_VERSIONS } from "./src/protocol.ts";
export type { Method } from "./src/protocol.ts";
export type {
  ConvertedLayerInfo,
  Descriptor,
  HistoryEntry,
  ImageConfiguration,
  ImageIndex,
  ImageManifest,
  Platform,
  RuntimeConfig,
} from "./src/oci.ts";
export type {
  ChildExit,
  FdStreamOptions,
  FileSink,
  Hasher,
  ReceivedPacket,
  SpawnRequest,
  Transport,
  TransportFactory,
} from "./src/transport.ts";
