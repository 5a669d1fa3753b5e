/**
 * The command line's contact with its runtime, behind one small interface: arguments, the two output
 * streams, whether standard error is a terminal, interrupts and the exit. `node:process` provides all
 * of it in Deno, Bun and Node; tests supply their own.
 *
 * @module
 */

import { realpathSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";

/** What the command line needs from the runtime. */
export interface CliIo {
  /** The arguments after the program name. */
  args: readonly string[];
  /** Writes to standard output; resolves once the runtime took the bytes (backpressure). */
  writeStdout(data: Uint8Array | string): Promise<void>;
  /** Writes to standard error (small, human-readable text). */
  writeStderr(text: string): void;
  /** Whether standard error is a terminal (progress is shown only then). */
  stderrIsTerminal: boolean;
  /** The terminal's width in columns. */
  columns(): number;
  /** Milliseconds, monotonic. */
  now(): number;
  /** Calls `handler` on SIGINT or SIGTERM; returns the function that stops listening. */
  onInterrupt(handler: (signal: string) => void): () => void;
}

const NAMED_ESCAPES: Record<string, string> = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };

/**
 * Makes text safe to show on a terminal: every control character (C0, DEL and C1, which includes the
 * ESC that starts every terminal sequence) becomes a visible escape such as `\x1b` or `\n`. Layer
 * names, file names and server messages reach error lines, and one carrying `ESC ] 0 ;` or `ESC [ 2 J`
 * would otherwise retitle or clear the user's terminal.
 *
 * @param text the text to show.
 * @returns `text` with each control character replaced by its escape.
 *
 * @example Escaping a hostile entry name
 * ```ts
 * import { escapeControls } from "./io.ts";
 * console.log(escapeControls("etc/\x1b]0;owned\x07passwd")); // etc/\x1b]0;owned\x07passwd, shown as typed
 * ```
 */
export function escapeControls(text: string): string {
  return text.replace(
    // deno-lint-ignore no-control-regex -- matching control characters is the point
    /[\x00-\x1f\x7f-\x9f]/g,
    (c) => NAMED_ESCAPES[c] ?? `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
}

/**
 * Writes lines of text to standard error, each with its control characters escaped: the one way the
 * command line writes a message there (the progress line escapes its text with the same function).
 *
 * @param io where to write.
 * @param lines the lines, without their newline.
 */
export function writeStderrLines(io: Pick<CliIo, "writeStderr">, ...lines: string[]): void {
  io.writeStderr(lines.map((line) => `${escapeControls(line)}\n`).join(""));
}

/** The {@linkcode CliIo} of this process, through `node:process`. */
export function processIo(): CliIo {
  // A closed pipe on stdout also arrives as an "error" event; the write callback reports it.
  process.stdout.on("error", () => {});
  return {
    // Deno.args is exact under `deno run` and in compiled binaries alike; Bun's argv has two leading entries.
    args: (globalThis as { Deno?: { args: string[] } }).Deno?.args ?? process.argv.slice(2),
    writeStdout(data) {
      return new Promise((resolve, reject) => {
        process.stdout.write(
          data,
          (err?: Error | null) =>
            err
              ? reject(new Error(`Cannot write to standard output: ${err.message}`, { cause: err }))
              : resolve(),
        );
      });
    },
    writeStderr(text) {
      process.stderr.write(text);
    },
    stderrIsTerminal: process.stderr.isTTY === true,
    columns: () => process.stderr.columns || 80,
    now: () => performance.now(),
    onInterrupt(handler) {
      const onInt = () => handler("SIGINT");
      const onTerm = () => handler("SIGTERM");
      process.on("SIGINT", onInt);
      process.on("SIGTERM", onTerm);
      return () => {
        process.off("SIGINT", onInt);
        process.off("SIGTERM", onTerm);
      };
    },
  };
}

/**
 * Whether the module of `meta` is the program's entry point: `import.meta.main` where the runtime has
 * it (Deno, Bun, Node 24), else (Node 20 and 22) whether it is the script Node was started with.
 *
 * @param meta The module's `import.meta`.
 * @returns True for the entry module.
 */
export function isEntryModule(meta: ImportMeta): boolean {
  const main = (meta as { main?: boolean }).main;
  if (typeof main === "boolean") return main;
  const script = process.argv[1];
  if (!script || !meta.url.startsWith("file:")) return false;
  try {
    return realpathSync(script) === realpathSync(fileURLToPath(meta.url));
  } catch {
    return false;
  }
}

/** Ends the process with `code` once standard output and standard error took what was written. */
export async function exitProcess(code: number): Promise<never> {
  const flushed = (stream: { write(text: string, callback: () => void): boolean }) =>
    new Promise<void>((resolve) => {
      try {
        stream.write("", () => resolve());
      } catch {
        resolve();
      }
    });
  await Promise.race([
    Promise.all([flushed(process.stdout), flushed(process.stderr)]),
    new Promise((resolve) => setTimeout(resolve, 1000)),
  ]);
  process.exit(code);
}
