/**
 * The wire format of `skopeo experimental-image-proxy`: request encoding, reply decoding and
 * validation, and which protocol version brought which method.
 *
 * @module
 */

import { ProtocolError, type ProxyErrorCode } from "./errors.ts";
export { BASE_PROTOCOL_VERSION } from "./versions.ts";

/** The server cuts requests longer than this; replies may be longer. */
export const MAX_REQUEST_SIZE = 32 * 1024;

/** The first protocol version that has each method. */
export const METHOD_VERSIONS = {
  Initialize: "0.2.3",
  OpenImage: "0.2.3",
  CloseImage: "0.2.3",
  GetManifest: "0.2.3",
  GetConfig: "0.2.3",
  GetFullConfig: "0.2.3",
  GetBlob: "0.2.3",
  FinishPipe: "0.2.3",
  Shutdown: "0.2.3",
  OpenImageOptional: "0.2.4",
  GetLayerInfo: "0.2.5",
  GetLayerInfoPiped: "0.2.7",
  GetRawBlob: "0.2.8",
} as const;

/** A protocol method name. */
export type Method = keyof typeof METHOD_VERSIONS;

/** A reply, after validation. */
export interface Reply {
  success: boolean;
  value: unknown;
  pipeid: number;
  error: string;
  errorCode: ProxyErrorCode | undefined;
}

/** The largest integer the server accepts: it parses numbers as doubles. */
const MAX_SAFE = Number.MAX_SAFE_INTEGER;

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** Encodes one request packet; rejects requests the server would truncate. */
export function encodeRequest(method: Method, args: unknown[]): Uint8Array {
  for (const arg of args) {
    if (typeof arg === "number" && (!Number.isInteger(arg) || arg < 0 || arg > MAX_SAFE)) {
      throw new RangeError(`Argument ${arg} of ${method} is not an integer between 0 and 2^53-1`);
    }
  }
  const bytes = encoder.encode(JSON.stringify({ method, args }));
  if (bytes.length > MAX_REQUEST_SIZE) {
    throw new RangeError(
      `Request ${method} is ${bytes.length} bytes, more than the proxy's limit of ${MAX_REQUEST_SIZE}`,
    );
  }
  return bytes;
}

const ERROR_CODES: ReadonlySet<string> = new Set(["EPIPE", "retryable", "other"]);

/** Decodes and validates one reply packet. */
export function decodeReply(method: Method, data: Uint8Array): Reply {
  let parsed: unknown;
  try {
    parsed = JSON.parse(decoder.decode(data));
  } catch (cause) {
    throw new ProtocolError(`Reply to ${method} is not valid JSON (${data.length} bytes)`, { cause });
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw new ProtocolError(`Reply to ${method} is not a JSON object`);
  }
  const reply = parsed as Record<string, unknown>;
  if (typeof reply.success !== "boolean") {
    throw new ProtocolError(`Reply to ${method} has no boolean "success"`);
  }
  const pipeid = reply.pipeid ?? 0;
  if (typeof pipeid !== "number" || !Number.isInteger(pipeid) || pipeid < 0 || pipeid > 0xffffffff) {
    throw new ProtocolError(`Reply to ${method} has an invalid "pipeid": ${JSON.stringify(reply.pipeid)}`);
  }
  const error = reply.error ?? "";
  if (typeof error !== "string") throw new ProtocolError(`Reply to ${method} has a non-string "error"`);
  const code = reply.error_code ?? "";
  if (typeof code !== "string") throw new ProtocolError(`Reply to ${method} has a non-string "error_code"`);
  return {
    success: reply.success,
    value: reply.value ?? null,
    pipeid,
    error,
    errorCode: ERROR_CODES.has(code) ? code as ProxyErrorCode : code === "" ? undefined : "other",
  };
}

/** Parses `MAJOR.MINOR.PATCH`; `undefined` for anything else. */
export function parseVersion(version: string): [number, number, number] | undefined {
  const match = /^(\d+)\.(\d+)\.(\d+)$/.exec(version);
  if (!match) return undefined;
  return [Number(match[1]), Number(match[2]), Number(match[3])];
}

/** Whether `version` is at least `required` (both `MAJOR.MINOR.PATCH`, same major as semver demands). */
export function versionAtLeast(version: string, required: string): boolean {
  const a = parseVersion(version);
  const b = parseVersion(required);
  if (!a || !b) return false;
  if (a[0] !== b[0]) return false;
  if (a[1] !== b[1]) return a[1] > b[1];
  return a[2] >= b[2];
}

/** Checks that a reply value is a non-negative safe integer (or -1 where "unknown" is allowed). */
export function expectInteger(method: Method, value: unknown, allowUnknown = false): number {
  if (
    typeof value !== "number" || !Number.isSafeInteger(value) ||
    (value < 0 && !(allowUnknown && value === -1))
  ) {
    throw new ProtocolError(
      `Reply to ${method} has an invalid value: expected an integer, got ${JSON.stringify(value)}`,
    );
  }
  return value;
}

/** Checks that a reply value is a string. */
export function expectString(method: Method, value: unknown): string {
  if (typeof value !== "string") {
    throw new ProtocolError(
      `Reply to ${method} has an invalid value: expected a string, got ${JSON.stringify(value)}`,
    );
  }
  return value;
}
