/**
 * The proxy client's public face: `ImageProxy` checks its arguments and hands each call to the module
 * that does the work: the request queue and lifecycle (connection.ts), the verified GetBlob stream
 * (blob-stream.ts), the GetRawBlob stream with its retries (raw-blob.ts).
 *
 * @module
 */

import {
  authDataBytes,
  DEFAULT_SKOPEO_CMD,
  envFlag,
  type ImageProxyConfig,
  skopeoArgv,
  timeouts,
} from "./config.ts";
import {
  ConfigurationError,
  ImageProxyError,
  ProtocolError,
  ProxyClosedError,
  ProxyExitedError,
  SpawnError,
} from "./errors.ts";
import {
  checkConfiguration,
  checkContentDigest,
  checkLayerInfo,
  checkManifest,
  type ConvertedLayerInfo,
  type Descriptor,
  type ImageConfiguration,
  type ImageManifest,
  type RuntimeConfig,
} from "./oci.ts";
import { expectInteger, expectString, type Method, versionAtLeast } from "./protocol.ts";
import {
  digestProblem,
  type ImageReference,
  type ImageReferenceLike,
  toImageReference,
} from "./reference.ts";
import { POLICY_VERSION, skopeoForVersion } from "./versions.ts";
import { defaultTransportFactory } from "./runtime/detect.ts";
import { Connection } from "./connection.ts";
import {
  BLOB_PIPE_SIZE,
  type BlobOptions,
  type BlobReader,
  blobStream,
  openBlob,
  type RawBlobOptions,
  type SaveBlobOptions,
  saveBlobTo,
} from "./blob-stream.ts";
import { openRawBlob } from "./raw-blob.ts";
import { withRetry } from "./retry.ts";

export type { BlobOptions, BlobReader, RawBlobOptions, SaveBlobOptions } from "./blob-stream.ts";
export { isTransient } from "./retry.ts";

/**
 * An image opened on a proxy: pass it to the fetch methods, then to `closeImage`.
 */
export class OpenedImage {
  /** The proxy's handle for the image. */
  readonly id: number;
  /** The reference it was opened with. */
  readonly reference: ImageReference;
  #closed = false;
  /** @internal */
  constructor(id: number, reference: ImageReference) {
    this.id = id;
    this.reference = reference;
  }
  /** Whether `closeImage` was called on it. */
  get closed(): boolean {
    return this.#closed;
  }
  /** @internal */
  markClosed(): void {
    this.#closed = true;
  }
}

/**
 * A running `skopeo experimental-image-proxy`.
 *
 * @example Fetching an image's manifest, configuration and first layer
 * ```ts
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 *
 * await using proxy = await ImageProxy.spawn();
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * const { digest, manifest } = await proxy.fetchManifest(img);
 * const config = await proxy.fetchConfig(img);
 * console.log(digest, config.architecture, manifest.layers.length);
 * const { stream } = await proxy.getDescriptor(img, manifest.layers[0]);
 * let bytes = 0;
 * for await (const chunk of stream) bytes += chunk.length;
 * console.log(`first layer: ${bytes} bytes, verified`);
 * await proxy.closeImage(img);
 * ```
 */
export class ImageProxy implements AsyncDisposable {
  /** The protocol version the proxy announced (`"0.2.3"` ... `"0.2.8"`). */
  readonly protocolVersion: string;
  readonly #connection: Connection;

  private constructor(connection: Connection) {
    this.#connection = connection;
    this.protocolVersion = connection.protocolVersion;
  }

  /**
   * Starts skopeo with `config`, performs `Initialize` and checks the protocol version.
   *
   * @throws {ConfigurationError} for contradictory or unsupported options.
   * @throws {SpawnError} when skopeo cannot be started.
   * @throws {ProxyTooOldError} when the proxy speaks a protocol older than 0.2.3.
   */
  static async spawn(config: ImageProxyConfig = {}): Promise<ImageProxy> {
    if (typeof config !== "object" || config === null) {
      throw new ConfigurationError("The configuration must be an object");
    }
    const factory = config.transport ?? await defaultTransportFactory();
    const debug = config.debug ?? envFlag(factory.env?.("CONTAINERS_IMAGE_PROXY_DEBUG"));
    const authData = authDataBytes(config.authData);
    const settings = timeouts(config);
    // Validate everything before anything is started.
    skopeoArgv(config, { sockfd: 3, authfd: authData ? 4 : undefined }, { debug });
    if (config.env !== undefined) {
      if (typeof config.env !== "object" || config.env === null) {
        throw new ConfigurationError('Option "env" must be an object of strings');
      }
      for (const [key, value] of Object.entries(config.env)) {
        if (typeof value !== "string") throw new ConfigurationError(`Option "env.${key}" must be a string`);
      }
    }
    const transport = await factory.spawn({
      argv: (fds) => skopeoArgv(config, fds, { debug }),
      env: config.env ?? {},
      authData,
      debug,
    });
    const connection = new Connection(transport, settings);
    let version: string;
    try {
      version = await connection.initialize();
    } catch (err) {
      const exit = await transport.close(500);
      if (
        config.decryptionKeys?.length && err instanceof ProxyExitedError &&
        /unknown flag: --decryption-key/.test(exit.stderrTail)
      ) {
        throw new ConfigurationError(
          'Option "decryptionKeys" is not supported by this skopeo: its experimental-image-proxy does not accept --decryption-key',
          { cause: err },
        );
      }
      if (err instanceof ProxyExitedError && exit.code === 127) {
        // setpriv (or a wrapper script) could not execute skopeo.
        throw new SpawnError(
          `Cannot start skopeo: ${
            exit.stderrTail.trim() || "command not found"
          }. Install it (Debian/Ubuntu: ` +
            `"apt-get install skopeo", Fedora: "dnf install skopeo") or point "skopeoCmd" at it`,
          config.skopeoCmd ?? DEFAULT_SKOPEO_CMD,
          { cause: err },
        );
      }
      throw err;
    }
    const proxy = new ImageProxy(connection);
    if (config.policy !== undefined && !versionAtLeast(version, POLICY_VERSION)) {
      await proxy.shutdown().catch(() => {});
      throw new ConfigurationError(
        `Option "policy" cannot be honoured: this proxy speaks protocol ${version}, which does not enforce ` +
          `signature policy (protocol ${POLICY_VERSION}, ${
            skopeoForVersion(POLICY_VERSION)
          }, does); install a newer skopeo`,
      );
    }
    return proxy;
  }

  /** The proxy's process id (for diagnostics). */
  get pid(): number | undefined {
    return this.#connection.transport.pid;
  }

  /** Whether the proxy speaks `method`; every method name is the protocol's. */
  supports(method: Method): boolean {
    return this.#connection.supports(method);
  }

  /**
   * Opens an image.
   *
   * @param reference `TRANSPORT:NAME` (a string or an {@linkcode ImageReference}).
   * @throws {InvalidReferenceError} for a malformed reference, {@linkcode RequestError} when it cannot be opened.
   */
  async openImage(reference: ImageReferenceLike): Promise<OpenedImage> {
    const ref = toImageReference(reference);
    const { reply } = await this.#withRetry(() =>
      this.#connection.call("OpenImage", [ref.toSkopeo()], "none", { context: `"${ref}"` })
    );
    const id = expectInteger("OpenImage", reply.value);
    if (id === 0) throw new ProtocolError("OpenImage returned the image id 0");
    return new OpenedImage(id, ref);
  }

  /**
   * Opens an image, or returns `null` when it does not exist. Needs protocol 0.2.4.
   */
  async openImageOptional(reference: ImageReferenceLike): Promise<OpenedImage | null> {
    const ref = toImageReference(reference);
    const { reply } = await this.#withRetry(() =>
      this.#connection.call("OpenImageOptional", [ref.toSkopeo()], "none", { context: `"${ref}"` })
    );
    const id = expectInteger("OpenImageOptional", reply.value);
    return id === 0 ? null : new OpenedImage(id, ref);
  }

  /** Closes an image; the handle is unusable afterwards. */
  async closeImage(image: OpenedImage): Promise<void> {
    this.#checkImage(image);
    image.markClosed();
    await this.#connection.call("CloseImage", [image.id], "none");
  }

  /**
   * Fetches the image's manifest, as OCI, and the digest of the manifest as stored.
   *
   * For a multi-arch image the proxy has already picked the instance for its platform (or the
   * `override*` options): `digest` is that instance manifest's digest, not the index's. Pull-by-digest
   * callers who expect the index digest must not compare against it.
   */
  async fetchManifestRaw(image: OpenedImage): Promise<{ digest: string; raw: Uint8Array }> {
    this.#checkImage(image);
    const { reply, fds } = await this.#connection.call("GetManifest", [image.id], "pipe");
    let digest: string;
    try {
      digest = checkContentDigest(
        expectString("GetManifest", reply.value),
        "The digest GetManifest returned",
      );
    } catch (err) {
      await this.#connection.discardPayload(fds[0], reply.pipeid);
      throw err;
    }
    const raw = await this.#connection.readPayload("GetManifest", fds[0], reply.pipeid);
    return { digest, raw };
  }

  /** {@linkcode ImageProxy.fetchManifestRaw}, parsed. */
  async fetchManifest(image: OpenedImage): Promise<{ digest: string; manifest: ImageManifest }> {
    const { digest, raw } = await this.fetchManifestRaw(image);
    return { digest, manifest: checkManifest(parseJson("GetManifest", raw)) };
  }

  /**
   * Fetches the full image configuration as the proxy re-serializes it. Its bytes differ from the
   * config blob: to match the manifest's config digest, fetch `manifest.config` with `getDescriptor`.
   */
  async fetchConfigRaw(image: OpenedImage): Promise<Uint8Array> {
    this.#checkImage(image);
    const { reply, fds } = await this.#connection.call("GetFullConfig", [image.id], "pipe");
    return await this.#connection.readPayload("GetFullConfig", fds[0], reply.pipeid);
  }

  /** {@linkcode ImageProxy.fetchConfigRaw}, parsed. */
  async fetchConfig(image: OpenedImage): Promise<ImageConfiguration> {
    return checkConfiguration(parseJson("GetFullConfig", await this.fetchConfigRaw(image)));
  }

  /**
   * Fetches only the `config` member of the image configuration (the protocol's `GetConfig`, kept for
   * completeness; {@linkcode ImageProxy.fetchConfig} returns the whole configuration).
   */
  async fetchRuntimeConfig(image: OpenedImage): Promise<RuntimeConfig> {
    this.#checkImage(image);
    const { reply, fds } = await this.#connection.call("GetConfig", [image.id], "pipe");
    const raw = await this.#connection.readPayload("GetConfig", fds[0], reply.pipeid);
    return parseJson("GetConfig", raw) as RuntimeConfig;
  }

  /**
   * Describes the layers to fetch (digest, size, media type). Uses `GetLayerInfoPiped` from protocol
   * 0.2.7, `GetLayerInfo` on 0.2.5 and 0.2.6, and returns `null` on older proxies.
   */
  async getLayerInfo(image: OpenedImage): Promise<ConvertedLayerInfo[] | null> {
    this.#checkImage(image);
    if (this.supports("GetLayerInfoPiped")) {
      const { reply, fds } = await this.#connection.call("GetLayerInfoPiped", [image.id], "pipe");
      const raw = await this.#connection.readPayload("GetLayerInfoPiped", fds[0], reply.pipeid);
      return checkLayerInfo(parseJson("GetLayerInfoPiped", raw));
    }
    if (this.supports("GetLayerInfo")) {
      const { reply } = await this.#connection.call("GetLayerInfo", [image.id], "none");
      return checkLayerInfo(reply.value);
    }
    return null;
  }

  /**
   * Streams a blob, verified by the proxy: the stream closes only after the proxy confirmed that
   * exactly `size` bytes with the right digest were sent.
   *
   * @throws {BlobError} when the proxy reports a different size.
   */
  async getBlob(
    image: OpenedImage,
    digest: string,
    size: number,
    options: BlobOptions = {},
  ): Promise<BlobReader> {
    this.#checkBlob(image, digest, size);
    const blob = await openBlob(this.#connection, image.id, digest, size, options);
    return { size, stream: blobStream(this.#connection, blob, options) };
  }

  /**
   * Whether {@linkcode ImageProxy.saveBlob} is available: the runtime adapter can move a pipe's bytes
   * into a file itself. The Deno, Bun and Node adapters can; a transport without `openFileSink` cannot.
   */
  get canSaveBlobs(): boolean {
    return this.#connection.transport.openFileSink !== undefined;
  }

  /**
   * Saves a blob, verified by the proxy, into the file `path` (created, or truncated), without passing
   * its bytes through JavaScript: the adapter moves them from skopeo's pipe into the file with
   * `splice(2)` (or, for a file that takes no splice, such as some devices, reads and writes them). Resolves with the byte count once the proxy confirmed size and digest and the file
   * was flushed to disk. On any failure the file is left partial: remove it (or write to a temporary
   * name and rename it on success, as `writeLayout` does).
   *
   * @example Saving a layer
   * ```ts
   * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
   * await using proxy = await ImageProxy.spawn();
   * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
   * const { manifest } = await proxy.fetchManifest(img);
   * const [layer] = manifest.layers;
   * if (proxy.canSaveBlobs) await proxy.saveBlob(img, layer.digest, layer.size, "./layer.tar.gz");
   * ```
   *
   * @throws {ImageProxyError} when the adapter cannot save blobs ({@linkcode ImageProxy.canSaveBlobs})
   * or the file cannot be written; {@linkcode BlobError} as {@linkcode ImageProxy.getBlob}.
   */
  async saveBlob(
    image: OpenedImage,
    digest: string,
    size: number,
    path: string,
    options: SaveBlobOptions = {},
  ): Promise<number> {
    const transport = this.#connection.transport;
    if (!transport.openFileSink) {
      throw new ImageProxyError(
        "This runtime adapter cannot save blobs to files; stream getBlob() into the file instead",
      );
    }
    if (typeof path !== "string" || path === "" || path.includes("\0")) {
      throw new TypeError("The path to save a blob to must be a non-empty string without NUL");
    }
    this.#checkBlob(image, digest, size);
    const blob = await openBlob(this.#connection, image.id, digest, size, options);
    const sinkOf = (fd: number) => transport.openFileSink!(fd, path, { pipeSize: BLOB_PIPE_SIZE });
    return await saveBlobTo(this.#connection, sinkOf, blob, path, options);
  }

  /** {@linkcode ImageProxy.getBlob} for a descriptor from a manifest. */
  getDescriptor(image: OpenedImage, descriptor: Descriptor, options: BlobOptions = {}): Promise<BlobReader> {
    return this.getBlob(image, descriptor.digest, descriptor.size, options);
  }

  /**
   * Streams a blob with `GetRawBlob` (protocol 0.2.8): the proxy does not hash, this client verifies
   * size and digest as the bytes go by. The stream closes only when both matched.
   */
  async getRawBlob(image: OpenedImage, digest: string, options: RawBlobOptions = {}): Promise<BlobReader> {
    this.#checkImage(image);
    checkDigest(digest);
    return await openRawBlob(this.#connection, image.id, digest, options);
  }

  /**
   * Sends `Shutdown`, waits for skopeo to exit and releases everything. Open streams error; later
   * calls fail with {@linkcode ProxyClosedError}. Idempotent.
   *
   * @throws {ProxyExitedError} when skopeo exited with a failure status.
   */
  shutdown(): Promise<void> {
    return this.#connection.shutdown();
  }

  /** Same as {@linkcode ImageProxy.shutdown}; what `await using` calls. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.shutdown();
  }

  #checkImage(image: OpenedImage): void {
    if (!(image instanceof OpenedImage)) {
      throw new TypeError("Expected an OpenedImage returned by openImage");
    }
    if (image.closed) throw new ProxyClosedError(`Image "${image.reference}" has been closed`);
  }

  #checkBlob(image: OpenedImage, digest: string, size: number): void {
    this.#checkImage(image);
    checkDigest(digest);
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`Blob size must be a non-negative integer, got ${size}`);
    }
  }

  /** Retries `operation` while it fails transiently, under the retry policy. */
  #withRetry<T>(operation: () => Promise<T>): Promise<T> {
    const connection = this.#connection;
    return withRetry(connection.timeouts.retry, () => connection.ended, operation);
  }
}

function checkDigest(digest: string): void {
  const problem = typeof digest === "string" ? digestProblem(digest) : "a digest is a string";
  if (problem) throw new RangeError(`Invalid digest: ${problem}`);
}

function parseJson(method: Method, raw: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(raw));
  } catch (cause) {
    throw new ProtocolError(`${method} returned data that is not valid JSON`, { cause });
  }
}
