/**
 * Picks the runtime adapter. The only place that looks at which runtime is running, and it only
 * looks: each adapter is loaded on demand, so Deno never loads `bun:ffi`, Bun never loads Deno's, and
 * neither loads Node's `koffi`.
 *
 * @module
 */

import { ImageProxyError } from "../errors.ts";
import type { TransportFactory } from "../transport.ts";
import type { ExtractCalls } from "./extract-calls.ts";
export type { ExtractCalls } from "./extract-calls.ts";

/** The runtime this code runs on, as far as the adapters care. */
export function detectRuntime(): "deno" | "bun" | "node" | "unknown" {
  const g = globalThis as { Bun?: unknown; Deno?: unknown; process?: { versions?: { node?: string } } };
  if (g.Bun !== undefined) return "bun";
  if (g.Deno !== undefined) return "deno";
  // Deno and Bun both claim a Node version too: only without either is it Node itself.
  if (typeof g.process?.versions?.node === "string") return "node";
  return "unknown";
}

/** Loads the adapter for this runtime. */
export async function defaultTransportFactory(): Promise<TransportFactory> {
  switch (detectRuntime()) {
    case "deno":
      return (await import("./deno.ts")).denoTransport;
    case "bun":
      return (await import("./bun.ts")).bunTransport;
    case "node":
      return (await import("./node.ts")).nodeTransport;
    default:
      throw new ImageProxyError(
        'No transport for this runtime: run under Deno, Bun or Node, or pass "transport" in the configuration',
      );
  }
}

export type { ZstdDecoder, ZstdDecoderOptions } from "./node-zstd.ts";

/**
 * Opens a zstd decoder on the system's libzstd, for Node before 22.15, whose `node:zlib` has no zstd.
 * Loaded on demand, like the adapters, so that only Node loads it.
 *
 * @param options the chunk size and window limit.
 * @returns the decoder.
 * @throws {Error} when `libzstd.so.1` cannot be loaded.
 */
export async function openNodeZstdDecoder(
  options: import("./node-zstd.ts").ZstdDecoderOptions,
): Promise<import("./node-zstd.ts").ZstdDecoder> {
  return (await import("./node-zstd.ts")).openZstdDecoder(options);
}

let extractCallsLoaded: Promise<ExtractCalls | undefined> | undefined;

/**
 * The calls an extraction uses for nanosecond times and extended attributes, bound by this runtime's
 * adapter (loaded on demand, once), or `undefined` when the runtime is unknown or cannot bind them
 * (Deno without `--allow-ffi`): extraction then sets times through `node:fs`, to the millisecond, and
 * writes no extended attribute.
 *
 * @returns the calls, or `undefined`.
 */
export function extractCalls(): Promise<ExtractCalls | undefined> {
  extractCallsLoaded ??= (async () => {
    try {
      switch (detectRuntime()) {
        case "deno":
          return (await import("./deno.ts")).extractCalls();
        case "bun":
          return (await import("./bun.ts")).extractCalls();
        case "node":
          return (await import("./node.ts")).extractCalls();
        default:
          return undefined;
      }
    } catch {
      return undefined;
    }
  })();
  return extractCallsLoaded;
}
