/**
 * The retry policy's arithmetic and which failures are worth repeating: shared by `openImage` and
 * the GetRawBlob stream.
 *
 * @module
 */

import type { RetryPolicy } from "./config.ts";
import { RequestError } from "./errors.ts";

/** How long to wait before attempt `attempt + 1`: doubling from the initial delay, up to the maximum. */
export function backoff(policy: Required<RetryPolicy>, attempt: number): number {
  return Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** (attempt - 1));
}

/** Resolves after `ms` milliseconds. */
export function delay(ms: number): Promise<undefined> {
  return new Promise((resolve) => setTimeout(() => resolve(undefined), ms));
}

/** Whether a failed request is worth repeating: the proxy says so, or it names a transient cause. */
export function isTransient(err: unknown): boolean {
  if (!(err instanceof RequestError)) return false;
  if (err.errorCode === "retryable") return true;
  if (err.errorCode === "other" || err.errorCode === "EPIPE") return false;
  return /\b(50[0-9]|429)\b|too many requests|connection (refused|reset)|i\/o timeout|handshake timeout|unexpected EOF|temporar/i
    .test(err.serverMessage);
}

/**
 * Runs `operation`, again while it fails transiently, under `policy`.
 *
 * @param policy The retry policy.
 * @param ended Whether retrying is pointless (the proxy is gone).
 * @param operation What to run.
 * @returns What `operation` returned.
 */
export async function withRetry<T>(
  policy: Required<RetryPolicy>,
  ended: () => boolean,
  operation: () => Promise<T>,
): Promise<T> {
  for (let attempt = 1;; attempt++) {
    try {
      return await operation();
    } catch (err) {
      if (attempt >= policy.attempts || !isTransient(err) || ended()) throw err;
      await delay(backoff(policy, attempt));
    }
  }
}
