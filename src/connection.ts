/**
 * One conversation with a proxy process: the request queue (one request on the wire at a time),
 * the race with the child's exit, the request timeout, reply validation, and the closed state that
 * ends every open stream. `Initialize` goes through the same path as every other request.
 *
 * @module
 */

import type { Timeouts } from "./config.ts";
import {
  ImageProxyError,
  ProtocolError,
  ProxyClosedError,
  ProxyExitedError,
  ProxyTooOldError,
  RequestError,
  RequestTimeoutError,
  UnsupportedMethodError,
} from "./errors.ts";
import { within } from "./async.ts";
import { readToLimit } from "./bytes.ts";
import {
  decodeReply,
  encodeRequest,
  expectString,
  type Method,
  METHOD_VERSIONS,
  parseVersion,
  type Reply,
  versionAtLeast,
} from "./protocol.ts";
import { BASE_PROTOCOL_VERSION } from "./versions.ts";
import type { ChildExit, ReceivedPacket, Transport } from "./transport.ts";

/** The fds a reply must carry: none, one pipe (with a pipeid), or GetRawBlob's data and error pipes. */
export type FdShape = "none" | "pipe" | "dual";

/** A validated reply and the fds it carried, now the caller's to close. */
export interface Received {
  reply: Reply;
  fds: number[];
}

/** The least time `Initialize` gets when a request timeout is set: the child is still starting. */
const START_TIMEOUT_MS = 30_000;

/** How one request is sent. */
export interface CallOptions {
  /** Said after the method in a `RequestError` (`"oci:/x:latest"`). */
  context?: string;
  /** Overrides `requestTimeoutMs` (0: wait forever). */
  timeoutMs?: number;
  /** How a `ProxyExitedError` for a connection lost mid-request begins. */
  exitContext?: string;
}

/** Small payloads (manifests, configs, layer info) larger than this are refused. */
const MAX_PAYLOAD = 64 * 1024 * 1024;
/** How long to wait for the exit status once the socket says the child is gone. */
const EXIT_WAIT_MS = 3000;
/** How long shutdown waits for skopeo to exit by itself before it is killed. */
const SHUTDOWN_GRACE_MS = 2000;

/** A running proxy's request queue and lifecycle. */
export class Connection {
  /** The adapter's connection to the child. */
  readonly transport: Transport;
  /** The timeouts and retry policy from the configuration. */
  readonly timeouts: Timeouts;
  #protocolVersion = "";
  #supported: ReadonlySet<Method> = new Set<Method>(["Initialize"]);
  /** Whether a request is on the wire; the others wait in `#waiting`, in order. */
  #busy = false;
  readonly #waiting: (() => void)[] = [];
  #exit: ChildExit | undefined;
  #shutdown: Promise<void> | undefined;
  #closedError: ImageProxyError | undefined;
  readonly #openStreams = new Set<() => void>();
  /** Rejects the request on the wire when the child exits (one at a time: the queue is serial). */
  #onExit: ((exit: ChildExit) => void) | undefined;

  /**
   * @param transport The adapter's connection to a freshly spawned child.
   * @param timeouts The timeouts and retry policy from the configuration.
   */
  constructor(transport: Transport, timeouts: Timeouts) {
    this.transport = transport;
    this.timeouts = timeouts;
    transport.exited.then((exit) => {
      this.#exit = exit;
      this.#onExit?.(exit);
    });
  }

  /**
   * Sends `Initialize` and checks the version the proxy announces.
   *
   * @returns The protocol version.
   * @throws {ProxyTooOldError} below the base version; {@linkcode ProtocolError} for a malformed one.
   */
  async initialize(): Promise<string> {
    const requestMs = this.timeouts.requestTimeoutMs;
    const { reply } = await this.call("Initialize", [], "none", {
      exitContext: "The image proxy exited before it was initialized",
      // Starting the child is not a request: a loaded machine can take seconds to exec it, so a short
      // request timeout would fail a healthy start. A hung start still fails when a timeout is set.
      timeoutMs: requestMs > 0 ? Math.max(requestMs, START_TIMEOUT_MS) : 0,
    });
    const version = expectString("Initialize", reply.value);
    if (!parseVersion(version)) throw new ProtocolError(`Proxy announced an invalid version "${version}"`);
    if (!versionAtLeast(version, BASE_PROTOCOL_VERSION)) {
      throw new ProxyTooOldError(version, BASE_PROTOCOL_VERSION);
    }
    this.#protocolVersion = version;
    // Decided once: every request checks it.
    this.#supported = new Set(
      (Object.keys(METHOD_VERSIONS) as Method[]).filter((m) => versionAtLeast(version, METHOD_VERSIONS[m])),
    );
    return version;
  }

  /** The version `Initialize` returned (empty before). */
  get protocolVersion(): string {
    return this.#protocolVersion;
  }

  /** Whether the proxy speaks `method`. */
  supports(method: Method): boolean {
    return this.#supported.has(method);
  }

  /** How the child exited, once it has. */
  get exit(): ChildExit | undefined {
    return this.#exit;
  }

  /** Whether no request can succeed any more: shut down, timed out, or the child is gone. */
  get ended(): boolean {
    return this.#closedError !== undefined || this.#exit !== undefined;
  }

  /**
   * The child's exit, if it happened or happens within a moment: what explains a pipe that ended
   * early or a copy that failed.
   */
  async exitSoon(): Promise<ProxyExitedError | undefined> {
    const exit = this.#exit ?? await within(this.transport.exited, 200);
    return exit ? exitError(exit) : undefined;
  }

  /**
   * Registers `abort`, called when the connection closes (shutdown or a request timeout) to error an
   * open stream. Returns the function that unregisters it.
   */
  track(abort: () => void): () => void {
    this.#openStreams.add(abort);
    return () => this.#openStreams.delete(abort);
  }

  /**
   * Queues one request.
   *
   * @returns Its validated reply and the fds it carried (closed on any failure).
   * @throws {ProxyClosedError}, {@linkcode UnsupportedMethodError}, {@linkcode RequestError},
   * {@linkcode ProtocolError}, {@linkcode ProxyExitedError}, {@linkcode RequestTimeoutError}.
   */
  call(method: Method, args: unknown[], shape: FdShape, options: CallOptions = {}): Promise<Received> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    if (!this.supports(method)) {
      return Promise.reject(
        new UnsupportedMethodError(method, METHOD_VERSIONS[method], this.#protocolVersion),
      );
    }
    let packet: Uint8Array;
    try {
      packet = encodeRequest(method, args);
    } catch (err) {
      return Promise.reject(err);
    }
    const { context, exitContext } = options;
    const timeoutMs = options.timeoutMs ?? this.timeouts.requestTimeoutMs;
    return this.#serially(() => {
      if (this.#exit) throw exitError(this.#exit);
      const transport = this.transport;
      let pending: ReceivedPacket | Promise<ReceivedPacket>;
      try {
        pending = transport.requestNow ? transport.requestNow(packet) : transport.request(packet);
      } catch (err) {
        return exitedError(transport, err, exitContext).then((error) => Promise.reject(error));
      }
      if (!(pending instanceof Promise)) {
        // The reply was already there: no timer, no race with the exit.
        return validateReply(transport, method, pending, shape, context);
      }
      return this.#awaitReply(method, pending, timeoutMs, exitContext).then((received) =>
        validateReply(transport, method, received, shape, context)
      );
    });
  }

  /** Sends `FinishPipe`: resolves once the server's writer for `pipeid` finished without error. */
  async finishPipe(pipeid: number, options?: CallOptions): Promise<void> {
    await this.call("FinishPipe", [pipeid], "none", options);
  }

  /** Reads a small pipe to the end while FinishPipe waits for the server's writer. */
  async readPayload(method: Method, fd: number, pipeid: number): Promise<Uint8Array> {
    const stream = this.transport.openStream(fd);
    const finished = this.finishPipe(pipeid, { context: `for ${method}` });
    let payload: Uint8Array | undefined;
    let readError: unknown;
    try {
      payload = await readToLimit(stream, MAX_PAYLOAD, method);
    } catch (err) {
      readError = err;
    }
    try {
      await finished;
    } catch (err) {
      throw err instanceof RequestError ? new RequestError(method, err.serverMessage, err.errorCode) : err;
    }
    if (payload === undefined) throw readError;
    return payload;
  }

  /** Settles a small pipe the caller will not read: a writer copying from memory ends at once with EPIPE. */
  async discardPayload(fd: number, pipeid: number): Promise<void> {
    this.transport.closeFd(fd);
    await this.finishPipe(pipeid).catch(() => {});
  }

  /**
   * Sends `Shutdown`, waits for the child to exit and releases everything; open streams error, later
   * calls fail with {@linkcode ProxyClosedError}. Idempotent.
   *
   * @throws {ProxyExitedError} when the child exited with a failure status.
   */
  shutdown(): Promise<void> {
    this.#shutdown ??= this.#doShutdown();
    return this.#shutdown;
  }

  async #doShutdown(): Promise<void> {
    this.#closedError = new ProxyClosedError();
    for (const abort of [...this.#openStreams]) abort();
    const transport = this.transport;
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
    exitContext: string | undefined,
  ): Promise<ReceivedPacket> {
    try {
      return await this.#untilExit(this.#withTimeout(method, request, timeoutMs), request);
    } catch (err) {
      throw await exitedError(this.transport, err, exitContext);
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
          request.then((value) => closeAll(this.transport, value.fds), () => {});
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
    const result = await within(request, ms);
    if (result !== undefined) return result;
    request.then((late) => closeAll(this.transport, late.fds), () => {});
    const error = new RequestTimeoutError(method, ms);
    this.#closedError ??= error;
    for (const abort of [...this.#openStreams]) abort();
    this.transport.close(0).catch(() => {});
    throw error;
  }
}

/** Validates a reply's shape; closes every fd on any failure. */
function validateReply(
  transport: Transport,
  method: Method,
  { data, fds }: ReceivedPacket,
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

/** Closes every fd in `fds`. */
export function closeAll(transport: Transport, fds: number[]): void {
  for (const fd of fds) transport.closeFd(fd);
}

/** The error for a child that exited while something still needed it. */
export function exitError(exit: ChildExit): ProxyExitedError {
  return new ProxyExitedError(exit, exit.stderrTail);
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
