/**
 * {@linkcode ImageProxyConfig} and its translation into a skopeo command line, as a pure function.
 *
 * @module
 */

import { ConfigurationError } from "./errors.ts";
import type { TransportFactory } from "./transport.ts";

/**
 * How to start and configure `skopeo experimental-image-proxy`. Field names follow the Rust client
 * containers-image-proxy-rs in camelCase; the rest are skopeo flags that client lacks.
 */
export interface ImageProxyConfig {
  /**
   * The command prefix that starts skopeo. The default, `setpriv --pdeathsig SIGTERM -- skopeo`, binds
   * skopeo's life to this process; a custom prefix replaces it (and must name skopeo itself).
   */
  skopeoCmd?: string[];
  /** Path to an auth.json file (`--authfile`). Conflicts with `authData` and `authAnonymous`. */
  authfile?: string;
  /**
   * auth.json content, handed to skopeo as an inherited memfd so that it never appears on a command
   * line or in the environment. Conflicts with `authfile` and `authAnonymous`.
   */
  authData?: string | Uint8Array;
  /** Use no credentials at all (`--no-creds`). */
  authAnonymous?: boolean;
  /** Directory with `*.crt`, `*.cert`, `*.key` for registry TLS (`--cert-dir`). */
  certificateDirectory?: string;
  /**
   * Keys to decrypt encrypted images (`--decryption-key`). No released skopeo's proxy accepts the flag
   * yet: with one that does not, spawning fails with a {@linkcode ConfigurationError}.
   */
  decryptionKeys?: string[];
  /** Disable TLS verification (`--tls-verify=false`). */
  insecureSkipTlsVerification?: boolean;
  /** Run skopeo with `--debug` and pass its stderr through. Also set by `CONTAINERS_IMAGE_PROXY_DEBUG`. */
  debug?: boolean;
  /** Signature policy file (`--policy`). Enforced by proxies of protocol 0.2.6 and newer only. */
  policy?: string;
  /** Accept any image regardless of policy (`--insecure-policy`). */
  insecurePolicy?: boolean;
  /** Registries.d directory for signature lookaside configuration (`--registries.d`). */
  registriesD?: string;
  /** A registries.conf file (skopeo's hidden global `--registries-conf`). */
  registriesConf?: string;
  /** Choose this architecture from manifest lists (`--override-arch`). */
  overrideArch?: string;
  /** Choose this OS from manifest lists (`--override-os`). */
  overrideOs?: string;
  /** Choose this variant from manifest lists (`--override-variant`). */
  overrideVariant?: string;
  /** Prefix for the User-Agent skopeo sends (`--user-agent-prefix`). */
  userAgentPrefix?: string;
  /** Directory for skopeo's temporary files (`--tmpdir`). */
  tmpdir?: string;
  /** Extra environment for the child. */
  env?: Record<string, string>;
  /**
   * Fail a request that gets no answer within this many milliseconds with a `RequestTimeoutError`,
   * and stop the proxy (its answer would arrive out of turn). Off (0) by default: opening an image on
   * a slow registry can legitimately take minutes.
   */
  requestTimeoutMs?: number;
  /**
   * Error a blob stream that receives no byte for this many milliseconds while a read is waiting (a
   * registry that stalls mid-blob hangs skopeo forever). The error is a retryable `BlobError`.
   * Default 120000; 0 turns it off. `BlobOptions.idleTimeoutMs` overrides it per blob.
   */
  blobIdleTimeoutMs?: number;
  /**
   * Retry transient failures with exponential backoff: `openImage`/`openImageOptional` failures the
   * proxy marks retryable (or that name a 5xx status or a network error), and `getRawBlob` copies whose
   * error pipe says `retryable` (resumed transparently; the digest still covers every byte). Digest
   * mismatches are never retried. Off by default.
   */
  retry?: RetryPolicy;
  /**
   * How to start the proxy: the runtime's adapter by default (picked automatically), or an injected
   * factory (a scripted peer in tests, a custom runtime).
   */
  transport?: TransportFactory;
}

/** How to retry transient failures (see `ImageProxyConfig.retry`). */
export interface RetryPolicy {
  /** Total attempts, the first included (at least 1). */
  attempts: number;
  /** Delay before the first retry; it doubles each time. Default 200 ms. */
  initialDelayMs?: number;
  /** Upper bound of the delay. Default 5000 ms. */
  maxDelayMs?: number;
}

/** The checked numeric and retry settings of a config. */
export interface Timeouts {
  requestTimeoutMs: number;
  blobIdleTimeoutMs: number;
  retry: Required<RetryPolicy>;
}

/** The default `blobIdleTimeoutMs`. */
export const DEFAULT_BLOB_IDLE_TIMEOUT_MS = 120_000;

function checkMs(value: unknown, field: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new ConfigurationError(`Option "${field}" must be a non-negative number of milliseconds`);
  }
  return value;
}

/** Validates the timeout and retry options and fills in defaults. */
export function timeouts(config: ImageProxyConfig): Timeouts {
  const retry = config.retry;
  if (retry !== undefined && (typeof retry !== "object" || retry === null)) {
    throw new ConfigurationError('Option "retry" must be an object like { attempts: 3 }');
  }
  const attempts = retry?.attempts ?? 1;
  if (!Number.isInteger(attempts) || attempts < 1) {
    throw new ConfigurationError('Option "retry.attempts" must be an integer of at least 1');
  }
  return {
    requestTimeoutMs: checkMs(config.requestTimeoutMs, "requestTimeoutMs", 0),
    blobIdleTimeoutMs: checkMs(config.blobIdleTimeoutMs, "blobIdleTimeoutMs", DEFAULT_BLOB_IDLE_TIMEOUT_MS),
    retry: {
      attempts,
      initialDelayMs: checkMs(retry?.initialDelayMs, "retry.initialDelayMs", 200),
      maxDelayMs: checkMs(retry?.maxDelayMs, "retry.maxDelayMs", 5000),
    },
  };
}

/** The default command prefix: util-linux `setpriv` makes the kernel send SIGTERM to skopeo when we die. */
export const DEFAULT_SKOPEO_CMD: readonly string[] = Object.freeze([
  "setpriv",
  "--pdeathsig",
  "SIGTERM",
  "--",
  "skopeo",
]);

function checkString(value: unknown, field: string): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "string" || value.length === 0) {
    throw new ConfigurationError(`Option "${field}" must be a non-empty string`);
  }
  if (value.includes("\0")) throw new ConfigurationError(`Option "${field}" contains a NUL byte`);
  return value;
}

function checkBoolean(value: unknown, field: string): boolean {
  if (value === undefined) return false;
  if (typeof value !== "boolean") throw new ConfigurationError(`Option "${field}" must be a boolean`);
  return value;
}

/** The skopeo command line for `config`, with the fds the child inherits. Pure: no I/O, no globals. */
export function skopeoArgv(
  config: ImageProxyConfig,
  fds: { sockfd: number; authfd?: number },
  options: { debug?: boolean } = {},
): string[] {
  const cmd = config.skopeoCmd ?? DEFAULT_SKOPEO_CMD;
  if (!Array.isArray(cmd) || cmd.length === 0 || cmd.some((a) => typeof a !== "string")) {
    throw new ConfigurationError('Option "skopeoCmd" must be a non-empty array of strings');
  }
  const debug = options.debug ?? config.debug ?? false;
  const authfile = checkString(config.authfile, "authfile");
  const authAnonymous = checkBoolean(config.authAnonymous, "authAnonymous");
  const hasAuthData = config.authData !== undefined;
  const authOptions = [authfile !== undefined, hasAuthData, authAnonymous].filter(Boolean).length;
  if (authOptions > 1) {
    throw new ConfigurationError(
      'Conflicting authentication options: use only one of "authfile", "authData" and "authAnonymous"',
    );
  }
  if (hasAuthData && fds.authfd === undefined) {
    throw new ConfigurationError('Option "authData" needs a memfd, and none was created');
  }

  const global: string[] = [];
  if (debug) global.push("--debug");
  const flag = (name: string, value: string | undefined) => {
    if (value !== undefined) global.push(`--${name}`, value);
  };
  flag("policy", checkString(config.policy, "policy"));
  if (checkBoolean(config.insecurePolicy, "insecurePolicy")) {
    if (config.policy !== undefined) {
      throw new ConfigurationError('Conflicting options: "policy" and "insecurePolicy"');
    }
    global.push("--insecure-policy");
  }
  flag("registries.d", checkString(config.registriesD, "registriesD"));
  flag("registries-conf", checkString(config.registriesConf, "registriesConf"));
  flag("override-arch", checkString(config.overrideArch, "overrideArch"));
  flag("override-os", checkString(config.overrideOs, "overrideOs"));
  flag("override-variant", checkString(config.overrideVariant, "overrideVariant"));
  flag("user-agent-prefix", checkString(config.userAgentPrefix, "userAgentPrefix"));
  flag("tmpdir", checkString(config.tmpdir, "tmpdir"));

  const proxy: string[] = ["experimental-image-proxy"];
  if (authfile !== undefined) proxy.push("--authfile", authfile);
  else if (hasAuthData) proxy.push("--authfile", `/proc/self/fd/${fds.authfd}`);
  else if (authAnonymous) proxy.push("--no-creds");
  const certDir = checkString(config.certificateDirectory, "certificateDirectory");
  if (certDir !== undefined) proxy.push("--cert-dir", certDir);
  if (config.decryptionKeys !== undefined) {
    if (!Array.isArray(config.decryptionKeys)) {
      throw new ConfigurationError('Option "decryptionKeys" must be an array of strings');
    }
    for (const [i, key] of config.decryptionKeys.entries()) {
      proxy.push("--decryption-key", checkString(key, `decryptionKeys[${i}]`)!);
    }
  }
  if (checkBoolean(config.insecureSkipTlsVerification, "insecureSkipTlsVerification")) {
    proxy.push("--tls-verify=false");
  }
  proxy.push("--sockfd", String(fds.sockfd));
  return [...cmd, ...global, ...proxy];
}

/** Encodes `authData` for the memfd; rejects anything that is not a string or bytes. */
export function authDataBytes(authData: string | Uint8Array | undefined): Uint8Array | undefined {
  if (authData === undefined) return undefined;
  if (typeof authData === "string") return new TextEncoder().encode(authData);
  if (authData instanceof Uint8Array) return authData;
  throw new ConfigurationError('Option "authData" must be a string or a Uint8Array');
}

/** Whether an environment value turns a boolean switch on (`CONTAINERS_IMAGE_PROXY_DEBUG=1`). */
export function envFlag(value: string | undefined): boolean {
  return value !== undefined && value !== "" && value !== "0" && value.toLowerCase() !== "false";
}
