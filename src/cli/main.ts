/**
 * The `image-proxy` command line: inspect, fetch and unpack container images through skopeo's
 * `experimental-image-proxy`, from Deno, Bun or Node.
 *
 * ```sh
 * deno run --allow-ffi --allow-run --allow-env --allow-read --allow-write jsr:@cip/containers-image-proxy/cli \
 *   metadata docker://quay.io/libpod/alpine:latest
 * bun src/cli/main.ts fetch oci:/srv/images/app:1 --output ./app-layout
 * node --import tsx src/cli/main.ts layers oci:/srv/images/app:1
 * ```
 *
 * JSON goes to standard output (blob bytes for `blob` and `blob-raw`); exit status 0 on success, 1
 * on failure with one line `error: ...` on standard error, 2 on bad usage. Run with `--help` for the
 * commands and options.
 *
 * @module
 * @tags allow-ffi, allow-run, allow-env, allow-read, allow-write
 */

import { ImageProxy } from "../proxy.ts";
import type { ImageProxyConfig } from "../config.ts";
import {
  CLI_REQUEST_TIMEOUT_SECONDS,
  commandHelp,
  mainHelp,
  parseArgs,
  type ParsedArgs,
  UsageError,
  usageHint,
} from "./args.ts";
import { HANDLERS, WITHOUT_PROXY } from "./commands.ts";
import { BlobCache, useBlobCache } from "../image/cache.ts";
import { type CliIo, exitProcess, isEntryModule, processIo, writeStderrLines } from "./io.ts";
import { ProgressLine } from "./progress.ts";

export type { CliIo } from "./io.ts";

/** Options for {@linkcode run}, for embedding and tests. */
export interface RunOptions {
  /** Starts the proxy (default {@linkcode ImageProxy.spawn}). */
  spawn?: (config: ImageProxyConfig) => Promise<ImageProxy>;
}

/** Collapses a message onto one line: the error contract is exactly one `error:` line. */
function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, "; ").trim();
}

function describe(err: unknown): string {
  // The library's advice names its option; on the command line that is --skopeo.
  if (err instanceof Error) return (err.message || err.name).replaceAll('"skopeoCmd"', "--skopeo");
  return String(err);
}

/**
 * Runs the command line `io.args` and returns the exit status (0, 1 or 2). Never throws; never exits.
 *
 * @example Running a command with this process's streams
 * ```ts ignore
 * import { processIo, run } from "jsr:@cip/containers-image-proxy/cli";
 * const status = await run({ ...processIo(), args: ["metadata", "oci:/srv/images/app:1"] });
 * ```
 */
export async function run(io: CliIo, options: RunOptions = {}): Promise<number> {
  let args: ParsedArgs;
  try {
    args = parseArgs(io.args);
  } catch (err) {
    if (err instanceof UsageError) {
      writeStderrLines(io, `error: ${oneLine(err.message)}`, usageHint(err.command));
      return 2;
    }
    writeStderrLines(io, `error: ${oneLine(describe(err))}`);
    return 1;
  }
  if (args.help) {
    await io.writeStdout(args.command ? commandHelp(args.command) : mainHelp());
    return 0;
  }
  const progress = new ProgressLine(
    { write: (text) => io.writeStderr(text), columns: io.columns, now: io.now },
    io.stderrIsTerminal && !args.quiet,
  );
  const controller = new AbortController();
  let interrupted: string | undefined;
  const stopListening = io.onInterrupt((signal) => {
    interrupted ??= signal;
    controller.abort(new Error(`Interrupted by ${signal}`));
  });
  let proxy: ImageProxy | undefined;
  let status = 0;
  try {
    const withoutProxy = WITHOUT_PROXY[args.command!];
    if (withoutProxy) return await withoutProxy({ args, io, signal: controller.signal });
    const spawnConfig = { requestTimeoutMs: CLI_REQUEST_TIMEOUT_SECONDS * 1000, ...args.config };
    proxy = await (options.spawn ?? ((config) => ImageProxy.spawn(config)))(spawnConfig);
    if (args.cache !== undefined) {
      useBlobCache(proxy, new BlobCache(args.cache, { maxBytes: args.cacheSize }));
    }
    controller.signal.throwIfAborted();
    const image = await proxy.openImage(args.operands[0]);
    await HANDLERS[args.command!]({ proxy, image, args, io, progress, signal: controller.signal });
  } catch (err) {
    progress.clear();
    if (args.config.debug && err instanceof Error && err.stack) {
      writeStderrLines(io, ...err.stack.split("\n"));
    }
    const message = interrupted ? `Interrupted by ${interrupted}` : describe(err);
    writeStderrLines(io, `error: ${oneLine(message)}`);
    status = interrupted ? 130 : 1;
  } finally {
    progress.clear();
    stopListening();
  }
  if (proxy) {
    try {
      await proxy.shutdown();
    } catch (err) {
      if (status === 0) {
        writeStderrLines(io, `error: ${oneLine(describe(err))}`);
        status = 1;
      }
    }
  }
  return status;
}

export { processIo };

if (isEntryModule(import.meta)) {
  await exitProcess(await run(processIo()));
}
