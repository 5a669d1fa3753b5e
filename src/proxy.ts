/**
 * The proxy client: one skopeo child, one request queue, and blob streams that end only once the
 * server has confirmed size and digest.
 *
 * @module
 */

import {
  authDataBytes,
  DEFAULT_SKOPEO_CMD,
  envFlag,
  type ImageProxyConfig,
  type RetryPolicy,
  skopeoArgv,
  type Timeouts,
  timeouts,
} from "./config.ts";
import {
  BlobError,
  ConfigurationError,
  ImageProxyError,
  ProtocolError,
  ProxyClosedError,
  ProxyExitedError,
  ProxyTooOldError,
  RequestError,
  RequestTimeoutError,
  SpawnError,
  UnsupportedMethodError,
} from "./errors.ts";
import { within } from "./async.ts";
import { concat } from "./bytes.ts";
import { createHasher } from "./hash.ts";
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
import {
  BASE_PROTOCOL_VERSION,
  decodeReply,
  encodeRequest,
  expectInteger,
  expectString,
  type Method,
  METHOD_VERSIONS,
  parseVersion,
  type Reply,
  versionAtLeast,
} from "./protocol.ts";
import {
  digestProblem,
  type ImageReference,
  type ImageReferenceLike,
  toImageReference,
} from "./reference.ts";
import { defaultTransportFactory } from "./runtime/detect.ts";
import type { ChildExit, FileSink, Hasher, ReceivedPacket, Transport } from "./transport.ts";

/** The fds a reply must carry. */
type FdShape = "none" | "pipe" | "dual";

/** Small payloads (manifests, configs, layer info) larger than this are refused. */
const MAX_PAYLOAD = 64 * 1024 * 1024;
/** How long to wait for the exit status once the socket says the child is gone. */
const EXIT_WAIT_MS = 3000;
/** Blob pipes are grown to this size: fewer, larger reads. */
const BLOB_PIPE_SIZE = 1 << 20;
/** Signature policy is enforced at OpenImage from this protocol version on. */
const POLICY_VERSION = "0.2.6";
/** A pipe with less free room than a page is full: its writer is blocked in write(). */
const PAGE_SIZE = 4096;
/** How long a cancelled GetBlob stream waits for data that shows its copy is alive (see cancel). */
const CANCEL_PROBE_MS = 2000;
/** How long shutdown waits for skopeo to exit by itself before it is killed. */
const SHUTDOWN_GRACE_MS = 2000;

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

/** A blob being streamed from the proxy. */
export interface BlobReader {
  /** The blob's size in bytes as the proxy reports it; -1 when unknown (raw blobs only). */
  size: number;
  /**
   * The blob's bytes. It closes normally only when size and digest were confirmed; any corruption,
   * short read or proxy failure errors it with a {@linkcode BlobError} or {@linkcode ProxyExitedError}.
   */
  stream: ReadableStream<Uint8Array>;
}

/** Options for a blob request. */
export interface BlobOptions {
  /** Aborting closes the pipe, settles the server side and errors the stream with the reason. */
  signal?: AbortSignal;
  /** Overrides the proxy's `blobIdleTimeoutMs` for this blob (0: wait forever). */
  idleTimeoutMs?: number;
}

/** Options for {@linkcode ImageProxy.saveBlob}. */
export interface SaveBlobOptions extends BlobOptions {
  /** Called with the number of bytes each time more of the blob reached the file. */
  onProgress?: (bytes: number) => void;
}

interface Received {
  reply: Reply;
  fds: number[];
}

/** What the blob streams count: a chunk of bytes, or the size of a piece moved into a file. */
interface Sized {
  readonly length: number;
}

/** The part of a stream reader the blob streams use. */
interface ChunkReader<T extends Sized> {
  read(): Promise<ReadableStreamReadResult<T>>;
  cancel(): Promise<void>;
}

/**
 * A running `skopeo experimental-image-proxy`.
 *
 * @example Fetching an image's manifest, configuration and first layer
 * ```ts ignore
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
  readonly #transport: Transport;
  /** Whether a request is on the wire; the others wait in `#waiting`, in order. */
  #busy = false;
  readonly #waiting: (() => void)[] = [];
  #exit: ChildExit | undefined;
  #shutdown: Promise<void> | undefined;
  #closedError: ImageProxyError | undefined;
  readonly #openStreams = new Set<() => void>();
  readonly #timeouts: Timeouts;
  readonly #supported: ReadonlySet<Method>;
  /** Rejects the request on the wire when the child exits (one at a time: the queue is serial). */
  #onExit: ((exit: ChildExit) => void) | undefined;

  private constructor(transport: Transport, protocolVersion: string, settings: Timeouts) {
    this.#transport = transport;
    this.protocolVersion = protocolVersion;
    this.#timeouts = settings;
    // Decided once: every request checks it.
    this.#supported = new Set(
      (Object.keys(METHOD_VERSIONS) as Method[]).filter((m) =>
        versionAtLeast(protocolVersion, METHOD_VERSIONS[m])
      ),
    );
    transport.exited.then((exit) => {
      this.#exit = exit;
      this.#onExit?.(exit);
    });
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
    let version: string;
    try {
      version = await ImageProxy.#initialize(transport);
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
    const proxy = new ImageProxy(transport, version, settings);
    if (config.policy !== undefined && !versionAtLeast(version, POLICY_VERSION)) {
      await proxy.shutdown().catch(() => {});
      throw new ConfigurationError(
        `Option "policy" cannot be honoured: this proxy speaks protocol ${version}, which does not enforce ` +
          `signature policy (protocol ${POLICY_VERSION}, skopeo 1.13 or newer, does); install a newer skopeo`,
      );
    }
    return proxy;
  }

  static async #initialize(transport: Transport): Promise<string> {
    const packet = encodeRequest("Initialize", []);
    let received;
    try {
      received = await raceExit(transport, transport.request(packet));
    } catch (err) {
      throw await exitedError(transport, err, "The image proxy exited before it was initialized");
    }
    closeAll(transport, received.fds);
    const reply = decodeReply("Initialize", received.data);
    if (!reply.success) throw new RequestError("Initialize", reply.error, reply.errorCode);
    if (received.fds.length !== 0 || reply.pipeid !== 0) {
      throw new ProtocolError("Reply to Initialize carried file descriptors");
    }
    const version = expectString("Initialize", reply.value);
    if (!parseVersion(version)) throw new ProtocolError(`Proxy announced an invalid version "${version}"`);
    if (!versionAtLeast(version, BASE_PROTOCOL_VERSION)) {
      throw new ProxyTooOldError(version, BASE_PROTOCOL_VERSION);
    }
    return version;
  }

  /** The proxy's process id (for diagnostics). */
  get pid(): number | undefined {
    return this.#transport.pid;
  }

  /** Whether the proxy speaks `method`; every method name is the protocol's. */
  supports(method: Method): boolean {
    return this.#supported.has(method);
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
      this.#call("OpenImage", [ref.toSkopeo()], "none", `"${ref}"`)
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
      this.#call("OpenImageOptional", [ref.toSkopeo()], "none", `"${ref}"`)
    );
    const id = expectInteger("OpenImageOptional", reply.value);
    return id === 0 ? null : new OpenedImage(id, ref);
  }

  /** Closes an image; the handle is unusable afterwards. */
  async closeImage(image: OpenedImage): Promise<void> {
    this.#checkImage(image);
    image.markClosed();
    await this.#call("CloseImage", [image.id], "none");
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
    const { reply, fds } = await this.#call("GetManifest", [image.id], "pipe");
    let digest: string;
    try {
      digest = checkContentDigest(
        expectString("GetManifest", reply.value),
        "The digest GetManifest returned",
      );
    } catch (err) {
      await this.#discardPipe(fds[0], reply.pipeid, "memory");
      throw err;
    }
    const raw = await this.#readPayload("GetManifest", fds[0], reply.pipeid);
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
    const { reply, fds } = await this.#call("GetFullConfig", [image.id], "pipe");
    return await this.#readPayload("GetFullConfig", fds[0], reply.pipeid);
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
    const { reply, fds } = await this.#call("GetConfig", [image.id], "pipe");
    const raw = await this.#readPayload("GetConfig", fds[0], reply.pipeid);
    return parseJson("GetConfig", raw) as RuntimeConfig;
  }

  /**
   * Describes the layers to fetch (digest, size, media type). Uses `GetLayerInfoPiped` from protocol
   * 0.2.7, `GetLayerInfo` on 0.2.5 and 0.2.6, and returns `null` on older proxies.
   */
  async getLayerInfo(image: OpenedImage): Promise<ConvertedLayerInfo[] | null> {
    this.#checkImage(image);
    if (this.supports("GetLayerInfoPiped")) {
      const { reply, fds } = await this.#call("GetLayerInfoPiped", [image.id], "pipe");
      const raw = await this.#readPayload("GetLayerInfoPiped", fds[0], reply.pipeid);
      return checkLayerInfo(parseJson("GetLayerInfoPiped", raw));
    }
    if (this.supports("GetLayerInfo")) {
      const { reply } = await this.#call("GetLayerInfo", [image.id], "none");
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
    const { fd, pipeid, sizeUnknown } = await this.#openBlob(image, digest, size, options);
    const reader = this.#transport.openStream(fd, { pipeSize: BLOB_PIPE_SIZE }).getReader();
    const stream = this.#verifiedStream(fd, pipeid, digest, size, sizeUnknown, options, reader);
    return { size, stream };
  }

  /**
   * Whether {@linkcode ImageProxy.saveBlob} is available: the runtime adapter can move a pipe's bytes
   * into a file itself. The Deno and Bun adapters can; a transport without `openFileSink` cannot.
   */
  get canSaveBlobs(): boolean {
    return this.#transport.openFileSink !== undefined;
  }

  /**
   * Saves a blob, verified by the proxy, into the file `path` (created, or truncated), without passing
   * its bytes through JavaScript: the adapter moves them from skopeo's pipe into the file with
   * `splice(2)` (or, for a file that takes no splice, such as some devices, reads and writes them). Resolves with the byte count once the proxy confirmed size and digest and the file
   * was flushed to disk. On any failure the file is left partial: remove it (or write to a temporary
   * name and rename it on success, as `writeLayout` does).
   *
   * @example Saving a layer
   * ```ts ignore
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
    const transport = this.#transport;
    if (!transport.openFileSink) {
      throw new ImageProxyError(
        "This runtime adapter cannot save blobs to files; stream getBlob() into the file instead",
      );
    }
    if (typeof path !== "string" || path === "" || path.includes("\0")) {
      throw new TypeError("The path to save a blob to must be a non-empty string without NUL");
    }
    const { fd, pipeid, sizeUnknown } = await this.#openBlob(image, digest, size, options);
    let sink: FileSink;
    try {
      sink = transport.openFileSink(fd, path, { pipeSize: BLOB_PIPE_SIZE });
    } catch (cause) {
      await this.#discardPipe(fd, pipeid, "blob");
      throw new ImageProxyError(`Cannot save blob ${digest}: ${(cause as Error).message}`, { cause });
    }
    let moved = 0;
    const reader: ChunkReader<Sized> = {
      read: async () => {
        let n: number;
        try {
          // Never more than the declared size; past it, any excess is moved only to be reported.
          n = await sink.move(moved < size ? Math.min(size - moved, BLOB_PIPE_SIZE) : BLOB_PIPE_SIZE);
        } catch (cause) {
          throw new ImageProxyError(
            `Saving blob ${digest} to "${path}" failed: ${(cause as Error).message}`,
            {
              cause,
            },
          );
        }
        if (n === 0) return { done: true, value: undefined };
        moved += n;
        return { done: false, value: { length: n } };
      },
      cancel: () => {
        sink.closePipe();
        return Promise.resolve();
      },
    };
    const stream = this.#verifiedStream(fd, pipeid, digest, size, sizeUnknown, options, reader);
    try {
      for await (const piece of stream) options.onProgress?.(piece.length);
    } catch (err) {
      // Without a flush: a pending move (on a stalled pipe, say) closes the file when it returns.
      await sink.closeFile(false).catch(() => {});
      throw err;
    }
    try {
      await sink.closeFile(true);
    } catch (cause) {
      throw new ImageProxyError(`Flushing blob ${digest} to "${path}" failed: ${(cause as Error).message}`, {
        cause,
      });
    }
    return moved;
  }

  /** Sends GetBlob and checks the reply; the pipe is the caller's to read and settle. */
  async #openBlob(
    image: OpenedImage,
    digest: string,
    size: number,
    options: BlobOptions,
  ): Promise<{ fd: number; pipeid: number; sizeUnknown: boolean }> {
    this.#checkImage(image);
    checkDigest(digest);
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`Blob size must be a non-negative integer, got ${size}`);
    }
    options.signal?.throwIfAborted();
    const { reply, fds } = await this.#call("GetBlob", [image.id, digest, size], "pipe");
    const [fd] = fds;
    let serverSize: number;
    try {
      serverSize = expectInteger("GetBlob", reply.value, true);
      if (serverSize >= 0 && serverSize !== size) {
        throw new BlobError(
          `Blob ${digest} has ${serverSize} bytes, but ${size} were expected`,
          digest,
          false,
        );
      }
      options.signal?.throwIfAborted();
    } catch (err) {
      await this.#discardPipe(fd, reply.pipeid, "blob");
      throw err;
    }
    return { fd, pipeid: reply.pipeid, sizeUnknown: serverSize < 0 };
  }

  /** {@linkcode ImageProxy.getBlob} for a descriptor from a manifest. */
  getDescriptor(image: OpenedImage, descriptor: Descriptor, options: BlobOptions = {}): Promise<BlobReader> {
    return this.getBlob(image, descriptor.digest, descriptor.size, options);
  }

  /**
   * Streams a blob with `GetRawBlob` (protocol 0.2.8): the proxy does not hash, this client verifies
   * size and digest as the bytes go by. The stream closes only when both matched.
   */
  async getRawBlob(image: OpenedImage, digest: string, options: BlobOptions = {}): Promise<BlobReader> {
    this.#checkImage(image);
    checkDigest(digest);
    const algorithm = digest.slice(0, digest.indexOf(":"));
    const hasher = createHasher(algorithm, this.#transport.createHasher?.bind(this.#transport));
    if (!hasher) {
      throw new BlobError(`Cannot verify ${digest}: no ${algorithm} implementation`, digest, false);
    }
    options.signal?.throwIfAborted();
    const { reply, fds } = await this.#call("GetRawBlob", [image.id, digest], "dual");
    const [dataFd, errorFd] = fds;
    let size: number;
    try {
      size = expectInteger("GetRawBlob", reply.value, true);
      options.signal?.throwIfAborted();
    } catch (err) {
      closeAll(this.#transport, fds);
      throw err;
    }
    return { size, stream: this.#rawStream(image, { dataFd, errorFd, size }, digest, hasher, options) };
  }

  /**
   * Sends `Shutdown`, waits for skopeo to exit and releases everything. Open streams error; later
   * calls fail with {@linkcode ProxyClosedError}. Idempotent.
   *
   * @throws {ProxyExitedError} when skopeo exited with a failure status.
   */
  shutdown(): Promise<void> {
    this.#shutdown ??= this.#doShutdown();
    return this.#shutdown;
  }

  async #doShutdown(): Promise<void> {
    this.#closedError = new ProxyClosedError();
    for (const abort of [...this.#openStreams]) abort();
    const transport = this.#transport;
    if (this.#exit === undefined) {
      // Shutdown goes after the request on the wire, if any, but never waits long for it.
      const sent = this.#serially(() => transport.send(encodeRequest("Shutdown", [])));
      await within(Promise.race([sent.then(() => transport.exited), transport.exited]), SHUTDOWN_GRACE_MS)
        .catch(() => {});
    }
    const exit = await transport.close(SHUTDOWN_GRACE_MS);
    if (exit.killed) return;
    if (exit.code !== 0) throw new ProxyExitedError(exit, exit.stderrTail, "The image proxy failed");
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

  /** Queues one request; resolves with its validated reply and the fds it carried. */
  #call(
    method: Method,
    args: unknown[],
    shape: FdShape,
    context?: string,
    timeoutMs = this.#timeouts.requestTimeoutMs,
  ): Promise<Received> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    if (!this.supports(method)) {
      return Promise.reject(
        new UnsupportedMethodError(method, METHOD_VERSIONS[method], this.protocolVersion),
      );
    }
    let packet: Uint8Array;
    try {
      packet = encodeRequest(method, args);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#serially(() => {
      if (this.#exit) throw exitError(this.#exit);
      const transport = this.#transport;
      let pending: ReceivedPacket | Promise<ReceivedPacket>;
      try {
        pending = transport.requestNow ? transport.requestNow(packet) : transport.request(packet);
      } catch (err) {
        return exitedError(transport, err).then((error) => Promise.reject(error));
      }
      if (!(pending instanceof Promise)) {
        // The reply was already there: no timer, no race with the exit.
        return validateReply(transport, method, pending.data, pending.fds, shape, context);
      }
      return this.#awaitReply(method, pending, timeoutMs).then((received) =>
        validateReply(transport, method, received.data, received.fds, shape, context)
      );
    });
  }

  /**
   * Runs `job` once every job queued before it has settled, so that one request at a time is on the
   * wire. A job that finishes synchronously lets the next one start at once: a program awaiting one
   * request after another sends each as soon as it asks, with no promise hop of the queue's own.
   */
  #serially<T>(job: () => T | Promise<T>): Promise<T> {
    if (this.#busy) {
      return new Promise<T>((resolve) => this.#waiting.push(() => resolve(this.#run(job))));
    }
    return this.#run(job);
  }

  /** Runs `job` now, holding the wire until it settles. */
  #run<T>(job: () => T | Promise<T>): Promise<T> {
    this.#busy = true;
    let result: T | Promise<T>;
    try {
      result = job();
    } catch (err) {
      this.#next();
      return Promise.reject(err);
    }
    if (result instanceof Promise) {
      result.then(this.#next, this.#next);
      return result;
    }
    this.#next();
    return Promise.resolve(result);
  }

  /** Marks the wire free and starts the next queued job, if any, in a microtask (no deep recursion). */
  readonly #next = (): void => {
    const waiter = this.#waiting.shift();
    if (waiter) queueMicrotask(waiter);
    else this.#busy = false;
  };

  /** Waits for a reply that was not there at once: with the request timeout and the child's exit. */
  async #awaitReply(
    method: Method,
    request: Promise<ReceivedPacket>,
    timeoutMs: number,
  ): Promise<ReceivedPacket> {
    try {
      return await this.#untilExit(this.#withTimeout(method, request, timeoutMs), request);
    } catch (err) {
      throw await exitedError(this.#transport, err);
    }
  }

  /**
   * Settles with `operation`, or rejects with the child's exit. Racing the exit promise itself would
   * leave one reaction on it per request for the proxy's whole life.
   */
  #untilExit(operation: Promise<ReceivedPacket>, request: Promise<ReceivedPacket>): Promise<ReceivedPacket> {
    return new Promise((resolve, reject) => {
      this.#onExit = (exit) => {
        // The child is gone: a complete reply may still be in the socket; take it if it comes at once.
        within(request, 50).then((late) => {
          if (late) return resolve(late);
          request.then((value) => closeAll(this.#transport, value.fds), () => {});
          reject(exitError(exit));
        }, () => reject(exitError(exit)));
      };
      operation.then((value) => {
        this.#onExit = undefined;
        resolve(value);
      }, (err) => {
        this.#onExit = undefined;
        reject(err);
      });
    });
  }

  /** Applies `requestTimeoutMs`: an unanswered request stops the proxy, whose answer would come out of turn. */
  async #withTimeout(method: Method, request: Promise<ReceivedPacket>, ms: number): Promise<ReceivedPacket> {
    if (ms <= 0) return await request;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<"expired">((resolve) => {
      timer = setTimeout(() => resolve("expired"), ms);
    });
    try {
      const result = await Promise.race([request, expired]);
      if (result !== "expired") return result;
    } finally {
      clearTimeout(timer);
    }
    request.then((late) => closeAll(this.#transport, late.fds), () => {});
    const error = new RequestTimeoutError(method, ms);
    this.#closedError ??= error;
    for (const abort of [...this.#openStreams]) abort();
    this.#transport.close(0).catch(() => {});
    throw error;
  }

  /** Settles a pipe the caller will not read: close our end, then let the server finish it. */
  async #discardPipe(fd: number, pipeid: number, writer: "memory" | "blob"): Promise<void> {
    if (writer === "blob") {
      // A blob's writer may be reading a stalled source: settle it as a cancelled blob is.
      const reader = this.#transport.openStream(fd).getReader();
      await this.#settleCancelled(fd, pipeid, reader, false, this.#timeouts.blobIdleTimeoutMs);
      return;
    }
    // A writer copying from memory ends at once with EPIPE once our end is closed.
    this.#transport.closeFd(fd);
    await this.#call("FinishPipe", [pipeid], "none").catch(() => {});
  }

  /** Reads a small pipe to the end while FinishPipe waits for the server's writer. */
  async #readPayload(method: Method, fd: number, pipeid: number): Promise<Uint8Array> {
    const stream = this.#transport.openStream(fd);
    const finished = this.#call("FinishPipe", [pipeid], "none", `for ${method}`);
    const chunks: Uint8Array[] = [];
    let length = 0;
    let readError: unknown;
    try {
      for await (const chunk of stream) {
        length += chunk.length;
        if (length > MAX_PAYLOAD) throw new ProtocolError(`${method} sent more than ${MAX_PAYLOAD} bytes`);
        chunks.push(chunk);
      }
    } catch (err) {
      readError = err;
    }
    try {
      await finished;
    } catch (err) {
      throw err instanceof RequestError ? new RequestError(method, err.serverMessage, err.errorCode) : err;
    }
    if (readError) throw readError;
    return concat(chunks);
  }

  /**
   * The lifecycle every blob stream shares: abort signal, shutdown, cancellation, and exactly one
   * `release` call that tells how the stream ended, so the server side is settled exactly once.
   */
  #guardedStream<T>(
    digest: string,
    signal: AbortSignal | undefined,
    step: (controller: ReadableStreamDefaultController<T>) => Promise<Step>,
    release: (how: "done" | "failed" | "cancelled") => void,
  ): ReadableStream<T> {
    let settled = false;
    let controllerRef: ReadableStreamDefaultController<T> | undefined;
    const settle = (how: "done" | "failed" | "cancelled"): boolean => {
      if (settled) return false;
      settled = true;
      this.#openStreams.delete(onShutdown);
      signal?.removeEventListener("abort", onAbort);
      release(how);
      return true;
    };
    const fail = (err: unknown) => {
      if (!settle("failed")) return;
      try {
        controllerRef?.error(err);
      } catch { /* already closed */ }
    };
    const onAbort = () => fail(signal?.reason);
    const onShutdown = () =>
      fail(new ProxyClosedError(`The image proxy was shut down while blob ${digest} was open`));
    this.#openStreams.add(onShutdown);
    signal?.addEventListener("abort", onAbort, { once: true });
    return new ReadableStream<T>({
      start: (controller) => {
        controllerRef = controller;
      },
      pull: async (controller) => {
        if (settled) return;
        try {
          // A pull that enqueues nothing is not called again: go on until a chunk or the end.
          let result: Step;
          do result = await step(controller); while (result === "again" && !settled);
          if (result === "done" && settle("done")) controller.close();
        } catch (err) {
          if (settle("failed")) throw err;
        }
      },
      cancel: () => {
        settle("cancelled");
      },
    }, { highWaterMark: 0 });
  }

  /**
   * A GetBlob stream: `size` bytes, then FinishPipe's verdict decides between close and error. The
   * chunks are those of `reader`: bytes, or the sizes of pieces a file sink moved.
   */
  #verifiedStream<T extends Sized>(
    fd: number,
    pipeid: number,
    digest: string,
    size: number,
    sizeUnknown: boolean,
    options: BlobOptions,
    reader: ChunkReader<T>,
  ): ReadableStream<T> {
    const idleMs = options.idleTimeoutMs ?? this.#timeouts.blobIdleTimeoutMs;
    let received = 0;
    let stalled = false;
    let finish: Promise<void> | undefined;
    // The server's writer holds the pipe until FinishPipe, and FinishPipe holds the server until the
    // writer is done: send it only once no more data is due (at once when the size is unknown).
    const startFinish = () => {
      finish ??= this.#call("FinishPipe", [pipeid], "none").then(() => {});
      return finish;
    };
    // Keep draining while FinishPipe is pending, so that a writer with extra bytes can finish.
    const serverVerdict = async (): Promise<void> => {
      const extra = drain(reader);
      try {
        await startFinish();
      } catch (err) {
        await extra.catch(() => {});
        throw blobFailure(err, digest);
      }
      if ((await extra) > 0) {
        throw new BlobError(`Blob ${digest} has more than the ${size} bytes expected`, digest, false);
      }
    };
    if (sizeUnknown) startFinish().catch(() => {});
    const step = async (controller: ReadableStreamDefaultController<T>): Promise<Step> => {
      if (received < size) {
        const result = await readWithin(reader, idleMs);
        if (result === STALLED) {
          stalled = true;
          throw stallError(digest, idleMs, received, size);
        }
        if (result.done) throw await this.#earlyEnd(digest, received, size, startFinish);
        if (received + result.value.length > size) {
          throw new BlobError(`Blob ${digest} has more than the ${size} bytes expected`, digest, false);
        }
        received += result.value.length;
        controller.enqueue(result.value);
        if (received < size) return "more";
      }
      await serverVerdict();
      return "done";
    };
    return this.#guardedStream(digest, options.signal, step, (how) => {
      if (how === "done" || finish) {
        reader.cancel().catch(() => {});
        return;
      }
      this.#settleCancelled(fd, pipeid, reader, stalled, idleMs).catch(() => {});
    });
  }

  /**
   * Settles the server side of a GetBlob stream given up before its end. FinishPipe waits for skopeo's
   * writer while holding the whole server. With our end closed, a writer that is sending ends at once
   * with EPIPE, but one reading a stalled source never does. So FinishPipe is sent only once the copy
   * shows it is alive: the pipe is full (its writer is blocked writing), or more data arrives within a
   * short probe. Otherwise the pipe is left to skopeo, whose copy ends with EPIPE if data flows again
   * and whose write end closes when it exits. Resolves once settled either way; never rejects.
   */
  async #settleCancelled(
    fd: number,
    pipeid: number,
    reader: ChunkReader<Sized>,
    stalled: boolean,
    idleMs: number,
  ): Promise<void> {
    let alive = false;
    if (!stalled) {
      const fill = this.#transport.pipeFill?.(fd);
      alive = fill !== undefined && fill.queued >= fill.capacity - PAGE_SIZE;
      if (!alive) {
        const probeMs = Math.min(idleMs > 0 ? idleMs : CANCEL_PROBE_MS, CANCEL_PROBE_MS);
        alive = (await within(reader.read().then((r) => !r.done, () => false), probeMs)) === true;
      }
    }
    reader.cancel().catch(() => {});
    if (!alive || this.#closedError || this.#exit) return;
    // Guarded all the same: a source that stalls just now must not wedge the proxy for good.
    const guard = idleMs > 0 ? Math.max(idleMs, 1000) : this.#timeouts.requestTimeoutMs;
    await this.#call("FinishPipe", [pipeid], "none", undefined, guard).catch(() => {});
  }

  /** Explains a pipe that ended before `size` bytes: the proxy died, or the server gave up. */
  async #earlyEnd(
    digest: string,
    received: number,
    size: number,
    startFinish: () => Promise<void>,
  ): Promise<ImageProxyError> {
    const exit = this.#exit ?? await within(this.#transport.exited, 200);
    if (exit) return exitError(exit);
    try {
      await startFinish();
    } catch (err) {
      return blobFailure(err, digest);
    }
    return new BlobError(`Blob ${digest} ended after ${received} of ${size} bytes`, digest, true);
  }

  /**
   * A GetRawBlob stream: hash and count locally, then read the error pipe for the server's verdict.
   * Retryable failures (the server's `retryable` code, or a stall) fetch the blob again under the
   * retry policy and skip what was already delivered; the digest still covers every byte.
   */
  #rawStream(
    image: OpenedImage,
    first: { dataFd: number; errorFd: number; size: number },
    digest: string,
    hasher: Hasher,
    options: BlobOptions,
  ): ReadableStream<Uint8Array> {
    const transport = this.#transport;
    const idleMs = options.idleTimeoutMs ?? this.#timeouts.blobIdleTimeoutMs;
    const policy = this.#timeouts.retry;
    const size = first.size;
    const expected = digest.slice(digest.indexOf(":") + 1);
    let copy = openCopy(transport, first.dataFd, first.errorFd);
    let attempt = 1;
    let received = 0;
    let skip = 0;

    const retryOrThrow = async (failure: BlobError): Promise<Step> => {
      if (!failure.retryable || attempt >= policy.attempts || this.#closedError || this.#exit) throw failure;
      copy.abandon();
      await delay(backoff(policy, attempt));
      attempt++;
      const { reply, fds } = await this.#call("GetRawBlob", [image.id, digest], "dual");
      const again = expectInteger("GetRawBlob", reply.value, true);
      copy = openCopy(transport, fds[0], fds[1]);
      if (again !== size) throw new BlobError(`Blob ${digest} changed size between attempts`, digest, false);
      skip = received;
      return "again";
    };

    const step = async (
      controller: ReadableStreamDefaultController<Uint8Array>,
    ): Promise<Step> => {
      const result = await readWithin(copy.reader, idleMs);
      if (result === STALLED) return await retryOrThrow(stallError(digest, idleMs, received, size));
      if (!result.done) {
        let chunk = result.value;
        if (skip > 0) {
          const dropped = Math.min(skip, chunk.length);
          skip -= dropped;
          chunk = chunk.subarray(dropped);
          if (chunk.length === 0) return "again";
        }
        if (size >= 0 && received + chunk.length > size) {
          throw new BlobError(`Blob ${digest} has more than the ${size} bytes announced`, digest, false);
        }
        received += chunk.length;
        hasher.update(chunk);
        controller.enqueue(chunk);
        return "more";
      }
      const failure = await copy.verdict();
      if (failure) {
        if (this.#exit) throw exitError(this.#exit);
        const code = failure.code === "retryable"
          ? "retryable"
          : failure.code === "EPIPE"
          ? "EPIPE"
          : "other";
        return await retryOrThrow(
          new BlobError(
            `Fetching blob ${digest} failed: ${failure.message ?? "unknown error"}`,
            digest,
            code === "retryable",
            { cause: new RequestError("GetRawBlob", failure.message ?? "", code) },
          ),
        );
      }
      if (skip > 0 || (size >= 0 && received !== size)) {
        const exit = this.#exit ?? await within(transport.exited, 200);
        if (exit) throw exitError(exit);
        throw new BlobError(`Blob ${digest} ended after ${received} of ${size} bytes`, digest, true);
      }
      const actual = hasher.hexDigest();
      if (actual !== expected) {
        const algorithm = digest.slice(0, digest.indexOf(":") + 1);
        throw new BlobError(
          `Blob ${digest} is corrupted: its content has the digest ${algorithm}${actual}`,
          digest,
          false,
        );
      }
      return "done";
    };
    return this.#guardedStream(digest, options.signal, step, (how) => {
      if (how !== "done") copy.abandon();
    });
  }

  /** Retries `operation` while it fails transiently, under the retry policy. */
  async #withRetry<T>(operation: () => Promise<T>): Promise<T> {
    const policy = this.#timeouts.retry;
    for (let attempt = 1;; attempt++) {
      try {
        return await operation();
      } catch (err) {
        if (attempt >= policy.attempts || !isTransient(err) || this.#closedError || this.#exit) throw err;
        await delay(backoff(policy, attempt));
      }
    }
  }
}

/** One GetRawBlob copy: its data reader and its error pipe. */
interface RawCopy {
  reader: ReadableStreamDefaultReader<Uint8Array>;
  /** Reads the error pipe to its end: the server's `{code, message}`, or undefined when all went well. */
  verdict(): Promise<{ code?: string; message?: string } | undefined>;
  /** Closes the data pipe and reads the error pipe in the background only to close it. */
  abandon(): void;
}

function openCopy(transport: Transport, dataFd: number, errorFd: number): RawCopy {
  // This client hashes every byte: let the adapter read big pieces while the hash runs.
  const reader = transport.openStream(dataFd, { pipeSize: BLOB_PIPE_SIZE, readerBusy: true }).getReader();
  const errors = transport.openStream(errorFd);
  let verdict: Promise<{ code?: string; message?: string } | undefined> | undefined;
  const read = () => {
    verdict ??= (async () => {
      const text = new TextDecoder().decode(await collect(errors, 1 << 20));
      if (text.trim() === "") return undefined;
      try {
        const parsed = JSON.parse(text);
        if (typeof parsed === "object" && parsed !== null) return parsed;
      } catch { /* not JSON: report the text */ }
      return { code: "other", message: text.trim() };
    })();
    return verdict;
  };
  return {
    reader,
    verdict: read,
    abandon: () => {
      reader.cancel().catch(() => {});
      // The server reports EPIPE on the error pipe after an early close: not an error.
      read().catch(() => {});
    },
  };
}

/** What one step of a blob stream did: enqueued a chunk, nothing yet, or reached a confirmed end. */
type Step = "more" | "again" | "done";

const STALLED = Symbol("stalled");

/** Reads one chunk, or gives up after `ms` without data (0: wait forever). */
async function readWithin<T extends Sized>(
  reader: ChunkReader<T>,
  ms: number,
): Promise<ReadableStreamReadResult<T> | typeof STALLED> {
  if (ms <= 0) return await reader.read();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const stalled = new Promise<typeof STALLED>((resolve) => {
    timer = setTimeout(() => resolve(STALLED), ms);
  });
  try {
    return await Promise.race([reader.read(), stalled]);
  } finally {
    clearTimeout(timer);
  }
}

function stallError(digest: string, ms: number, received: number, size: number): BlobError {
  const of = size >= 0 ? ` of ${size}` : "";
  return new BlobError(
    `Blob ${digest} stalled: no data for ${ms} ms after ${received}${of} bytes`,
    digest,
    true,
  );
}

function backoff(policy: Required<RetryPolicy>, attempt: number): number {
  return Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** (attempt - 1));
}

/** Whether a failed request is worth repeating: the proxy says so, or it names a transient cause. */
export function isTransient(err: unknown): boolean {
  if (!(err instanceof RequestError)) return false;
  if (err.errorCode === "retryable") return true;
  if (err.errorCode === "other" || err.errorCode === "EPIPE") return false;
  return /\b(50[0-9]|429)\b|too many requests|connection (refused|reset)|i\/o timeout|handshake timeout|unexpected EOF|temporar/i
    .test(err.serverMessage);
}

/** Validates a reply's shape; closes every fd on any failure. */
function validateReply(
  transport: Transport,
  method: Method,
  data: Uint8Array,
  fds: number[],
  shape: FdShape,
  context: string | undefined,
): Received {
  try {
    const reply = decodeReply(method, data);
    if (!reply.success) throw new RequestError(method, reply.error, reply.errorCode, context);
    const expected = shape === "none" ? 0 : shape === "pipe" ? 1 : 2;
    if (fds.length !== expected) {
      throw new ProtocolError(
        `Reply to ${method} carried ${fds.length} file descriptors, expected ${expected}`,
      );
    }
    if (shape === "pipe" ? reply.pipeid === 0 : reply.pipeid !== 0) {
      throw new ProtocolError(
        `Reply to ${method} has pipeid ${reply.pipeid}, expected ${
          shape === "pipe" ? "a non-zero one" : "0"
        }`,
      );
    }
    return { reply, fds };
  } catch (err) {
    closeAll(transport, fds);
    throw err;
  }
}

function closeAll(transport: Transport, fds: number[]): void {
  for (const fd of fds) transport.closeFd(fd);
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

async function collect(stream: ReadableStream<Uint8Array>, limit: number): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let length = 0;
  for await (const chunk of stream) {
    length += chunk.length;
    if (length > limit) throw new ProtocolError(`Error pipe sent more than ${limit} bytes`);
    chunks.push(chunk);
  }
  return concat(chunks);
}

/** Reads a stream to its end, counting and discarding what arrives. */
async function drain(reader: ChunkReader<Sized>): Promise<number> {
  let extra = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return extra;
    extra += value.length;
  }
}

function blobFailure(err: unknown, digest: string): ImageProxyError {
  if (err instanceof RequestError) {
    return new BlobError(
      `Blob ${digest} failed verification by the proxy: ${err.serverMessage}`,
      digest,
      err.retryable,
      { cause: err },
    );
  }
  return err instanceof ImageProxyError ? err : new ImageProxyError(String(err), { cause: err });
}

function exitError(exit: ChildExit): ProxyExitedError {
  return new ProxyExitedError(exit, exit.stderrTail);
}

function delay(ms: number): Promise<undefined> {
  return new Promise((resolve) => setTimeout(() => resolve(undefined), ms));
}

/** Races a transport operation against the child's exit (used once, for Initialize); a late reply's fds are closed. */
async function raceExit<T extends { fds: number[] }>(
  transport: Transport,
  operation: Promise<T>,
): Promise<T> {
  const exited = transport.exited.then((exit) => ({ exit }));
  const result = await Promise.race([operation.then((value) => ({ value })), exited]);
  if ("value" in result) return result.value;
  // The child is gone: a reply may still be in the socket; take it if it is complete.
  const late = await within(operation.then((value) => ({ value }), () => undefined), 50);
  if (late && "value" in late) return late.value;
  operation.then((value) => closeAll(transport, value.fds), () => {});
  throw exitError(result.exit);
}

/** Turns a transport failure into the error a caller should see. */
async function exitedError(transport: Transport, err: unknown, context?: string): Promise<ImageProxyError> {
  if (err instanceof ImageProxyError) return err;
  const exit = await within(transport.exited, EXIT_WAIT_MS);
  if (exit) return new ProxyExitedError(exit, exit.stderrTail, context);
  return new ProtocolError(`Lost the connection to the image proxy: ${(err as Error)?.message ?? err}`, {
    cause: err,
  });
}
