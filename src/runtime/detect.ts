/**
 * Picks the runtime adapter. The only place that looks at which runtime is running, and it only
 * looks: each adapter is loaded on demand, so Deno never loads `bun:ffi` and Bun never loads Deno's.
 *
 * @module
 */

import { ImageProxyError } from "../errors.ts";
import type { TransportFactory } from "../transport.ts";

/** The runtime this code runs on, as far as the adapters care. */
export function detectRuntime(): "deno" | "bun" | "unknown" {
  const g = globalThis as { Bun?: unknown; Deno?: unknown };
  if (g.Bun !== undefined) return "bun";
  if (g.Deno !== undefined) return "deno";
  return "unknown";
}

/** Loads the adapter for this runtime. */
export async function defaultTransportFactory(): Promise<TransportFactory> {
  switch (detectRuntime()) {
    case "deno":
      return (await import("./deno.ts")).denoTransport;
    case "bun":
      return (await import("./bun.ts")).bunTransport;
    default:
      throw new ImageProxyError(
        'No transport for this runtime: run under Deno or Bun, or pass "transport" in the configuration',
      );
  }
}
