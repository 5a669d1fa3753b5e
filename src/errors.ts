/**
 * The error classes the library throws. Every one extends {@linkcode ImageProxyError}, so a caller can
 * catch the whole family with one `instanceof` and tell the cases apart with the subclasses.
 *
 * @module
 */

import { skopeoForVersion } from "./versions.ts";

/**
 * Base class of every error this library throws on purpose.
 *
 * @example Catching every error of the library
 * ```ts
 * import { ImageProxyError, ProxyTooOldError } from "./errors.ts";
 * const err: unknown = new ProxyTooOldError("0.2.1", "0.2.3");
 * if (err instanceof ImageProxyError) console.log(err.name, err.message);
 * ```
 */
export class ImageProxyError extends Error {
  /** Creates an error with a message and an optional cause. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ImageProxyError";
  }
}

/** skopeo could not be started: the command is missing or not executable. */
export class SpawnError extends ImageProxyError {
  /** The command line that failed to start (no secrets are ever part of it). */
  readonly command: readonly string[];
  /** Creates the error for a command line that failed to start. */
  constructor(message: string, command: readonly string[], options?: ErrorOptions) {
    super(message, options);
    this.name = "SpawnError";
    this.command = command;
  }
}

/**
 * The error for a command line that could not be started, saying how to install skopeo. Shared by
 * the runtime adapters.
 */
export function cannotStart(argv: readonly string[], err: unknown): SpawnError {
  const hint = argv[0] === "setpriv" ? " (setpriv is in util-linux)" : "";
  return new SpawnError(
    `Cannot start "${argv[0]}"${hint}: ${(err as Error).message}. Install skopeo (Debian/Ubuntu: ` +
      `"apt-get install skopeo", Fedora: "dnf install skopeo") or set "skopeoCmd"`,
    argv,
    { cause: err },
  );
}

/** The proxy speaks a protocol version older than the oldest this library supports (0.2.3). */
export class ProxyTooOldError extends ImageProxyError {
  /** The version the proxy announced in its `Initialize` reply. */
  readonly found: string;
  /** The oldest version this library supports. */
  readonly required: string;
  /** Creates the error for a proxy announcing `found` when at least `required` is needed. */
  constructor(found: string, required: string) {
    const skopeo = skopeoForVersion(required);
    super(
      `Proxy protocol version "${found}" is too old: at least "${required}" is needed${
        skopeo ? ` (${skopeo})` : ""
      }`,
    );
    this.name = "ProxyTooOldError";
    this.found = found;
    this.required = required;
  }
}

/** The method exists in the protocol, but not in the version this proxy speaks. */
export class UnsupportedMethodError extends ImageProxyError {
  /** The protocol method, in the protocol's words (`GetRawBlob`). */
  readonly method: string;
  /** The first protocol version that has the method. */
  readonly requiredVersion: string;
  /** The version the running proxy speaks. */
  readonly protocolVersion: string;
  /**
   * Creates the error for `method`, which needs `requiredVersion` while the proxy speaks `protocolVersion`.
   *
   * @param method The protocol method (`GetRawBlob`).
   * @param requiredVersion The first protocol version that has it.
   * @param protocolVersion The version the running proxy speaks.
   * @param feature What asked for the method, when it was not a direct call (`--raw-blobs`): the
   * message then leads with it.
   */
  constructor(method: string, requiredVersion: string, protocolVersion: string, feature?: string) {
    const skopeo = skopeoForVersion(requiredVersion);
    super(
      `${
        feature ? `${feature} needs ${method}, which` : `Method "${method}"`
      } needs proxy protocol version ${requiredVersion} or newer${
        skopeo ? ` (${skopeo})` : ""
      }, but this proxy speaks ${protocolVersion}`,
    );
    this.name = "UnsupportedMethodError";
    this.method = method;
    this.requiredVersion = requiredVersion;
    this.protocolVersion = protocolVersion;
  }
}

/** The error codes a 0.2.8 proxy attaches to a failed reply or a raw blob's error pipe. */
export type ProxyErrorCode = "EPIPE" | "retryable" | "other";

/** What to do about the setup mistakes skopeo reports in its own words. */
const HINTS: [RegExp, string][] = [
  [
    /x509:|failed to verify certificate/,
    'set "certificateDirectory" to a folder holding the registry\'s CA as ca.crt, or "insecureSkipTlsVerification"',
  ],
  [
    /server gave HTTP response to HTTPS client/,
    'the registry speaks plain HTTP: set "insecureSkipTlsVerification", or insecure = true in registries.conf',
  ],
  [/authentication required|unauthorized/, 'pass credentials with "authfile" or "authData"'],
];

/** The proxy answered a request with `success: false`. */
export class RequestError extends ImageProxyError {
  /** The protocol method that failed. */
  readonly method: string;
  /** The proxy's own error message. */
  readonly serverMessage: string;
  /** The proxy's error code (protocol 0.2.8 and newer), or `undefined`. */
  readonly errorCode: ProxyErrorCode | undefined;
  /** Creates the error for a failed reply to `method`. */
  constructor(method: string, serverMessage: string, errorCode?: ProxyErrorCode, context?: string) {
    const hint = HINTS.find(([pattern]) => pattern.test(serverMessage))?.[1];
    super(`${method}${context ? ` ${context}` : ""} failed: ${serverMessage}${hint ? ` (${hint})` : ""}`);
    this.name = "RequestError";
    this.method = method;
    this.serverMessage = serverMessage;
    this.errorCode = errorCode;
  }
  /** Whether the proxy marked the failure as one worth retrying. */
  get retryable(): boolean {
    return this.errorCode === "retryable";
  }
}

/** How the proxy process ended. */
export interface ExitStatus {
  /** The exit code, or `null` when a signal ended it. */
  code: number | null;
  /** The signal that ended it (`"SIGKILL"`), or `null`. */
  signal: string | null;
}

/** Formats an exit status the way a person reads it: `exit code 1`, `signal SIGKILL`. */
export function describeExit(status: ExitStatus): string {
  return status.signal ? `signal ${status.signal}` : `exit code ${status.code}`;
}

/** The proxy process exited while something still needed it. */
export class ProxyExitedError extends ImageProxyError {
  /** How the process ended. */
  readonly status: ExitStatus;
  /** The last lines skopeo wrote to stderr (empty with `debug`, where stderr is passed through). */
  readonly stderrTail: string;
  /** Creates the error for a proxy that ended with `status`, having printed `stderrTail` last. */
  constructor(status: ExitStatus, stderrTail: string, context = "The image proxy exited unexpectedly") {
    const tail = stderrTail.trim();
    super(`${context} (${describeExit(status)})${tail ? `: ${tail}` : ""}`);
    this.name = "ProxyExitedError";
    this.status = status;
    this.stderrTail = stderrTail;
  }
}

/** The proxy sent something the protocol does not allow (bad JSON, wrong types, wrong fd count). */
export class ProtocolError extends ImageProxyError {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ProtocolError";
  }
}

/** The configuration asks for something impossible or contradictory. */
export class ConfigurationError extends ImageProxyError {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConfigurationError";
  }
}

/** A blob stream failed: corruption, wrong size, a broken copy on the proxy's side. */
export class BlobError extends ImageProxyError {
  /** The digest of the blob that failed. */
  readonly digest: string;
  /** Whether fetching the blob again may succeed (the proxy said so, or the proxy stalled). */
  readonly retryable: boolean;
  /** Creates the error for the blob `digest`. */
  constructor(message: string, digest: string, retryable: boolean, options?: ErrorOptions) {
    super(message, options);
    this.name = "BlobError";
    this.digest = digest;
    this.retryable = retryable;
  }
}

/**
 * The proxy did not answer a request within `requestTimeoutMs`. The proxy is stopped at that point
 * (a late reply would be taken for the answer to the next request), so later calls fail too.
 */
export class RequestTimeoutError extends ImageProxyError {
  /** The protocol method that got no answer. */
  readonly method: string;
  /** The timeout that expired, in milliseconds. */
  readonly timeoutMs: number;
  /** Creates the error for `method`, unanswered after `timeoutMs`. */
  constructor(method: string, timeoutMs: number) {
    super(`${method} got no answer within ${timeoutMs} ms: the image proxy was stopped`);
    this.name = "RequestTimeoutError";
    this.method = method;
    this.timeoutMs = timeoutMs;
  }
}

/** The proxy was shut down, or the image was closed, before the call. */
export class ProxyClosedError extends ImageProxyError {
  /** Creates the error. */
  constructor(message = "The image proxy has been shut down") {
    super(message);
    this.name = "ProxyClosedError";
  }
}

/**
 * An OCI layout folder cannot be written safely: something in it that this library did not create is
 * a symbolic link, or not the kind of file the layout needs there, or is not valid layout metadata.
 * The message names the path, never what the file or the link's target holds.
 */
export class LayoutError extends ImageProxyError {
  /** The path inside the layout that was refused. */
  readonly path: string;
  /** Creates the error for `path`, explaining `reason`. */
  constructor(path: string, reason: string) {
    super(`Cannot write the OCI layout: "${path}" ${reason}`);
    this.name = "LayoutError";
    this.path = path;
  }
}

/** An image reference that containers/image would not accept, caught before it reaches skopeo. */
export class InvalidReferenceError extends ImageProxyError {
  /** The reference as given. */
  readonly reference: string;
  /** Creates the error for `reference`, explaining `reason`. */
  constructor(reference: string, reason: string) {
    super(`Invalid image reference "${reference}": ${reason}`);
    this.name = "InvalidReferenceError";
    this.reference = reference;
  }
}
