/**
 * Helpers for the CLI, layout and extraction tests: running `image-proxy` as a subprocess under the
 * runtime running the tests, building OCI layouts with any layer bytes (gzip, zstd, uncompressed), and
 * crafting tar entries the fixtures' writer does not make (PAX, GNU long names, any type flag).
 */

import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { IN_CI, ROOT, scriptCommand } from "./env.ts";
import { concat } from "../../src/bytes.ts";

/** What a CLI run produced. */
export interface CliResult {
  status: number | null;
  stdout: Uint8Array;
  stderr: string;
  /** stdout as text. */
  text: string;
  /** stdout parsed as JSON (throws when it is not). */
  json(): unknown;
}

const MAIN = join(ROOT, "src", "cli", "main.ts");
const DENO_FLAGS = ["--allow-ffi", "--allow-run", "--allow-env", "--allow-read", "--allow-write"];

/**
 * The command line that starts the CLI: the single binary named by IMAGE_PROXY_BIN (CI builds one
 * with `bun build --compile` and runs the CLI tests against it), else the source under the runtime
 * running the tests.
 */
export function cliCommand(): string[] {
  const binary = process.env.IMAGE_PROXY_BIN;
  if (binary) return [binary];
  return scriptCommand(MAIN, DENO_FLAGS);
}

/** Runs `image-proxy ARGS...` to completion. */
export function runCli(args: string[], options: { timeoutMs?: number } = {}): CliResult {
  const [command, ...prefix] = cliCommand();
  const result = spawnSync(command, [...prefix, ...args], {
    cwd: ROOT,
    env: { ...process.env, NO_COLOR: "1" },
    maxBuffer: 64 * 1024 * 1024,
    timeout: options.timeoutMs ?? 60_000,
  });
  if (result.error) throw result.error;
  const stdout = new Uint8Array(result.stdout);
  const text = new TextDecoder().decode(stdout);
  return {
    status: result.status,
    stdout,
    stderr: result.stderr.toString(),
    text,
    json: () => JSON.parse(text),
  };
}

/** `sha256:<hex>` of `data`. */
export function digestOf(data: Uint8Array | string): string {
  return "sha256:" + createHash("sha256").update(data).digest("hex");
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === "EPERM";
  }
}

/**
 * This process's folder for temporary files. Test runners do not reliably run exit hooks, so folders
 * left by earlier runs (their process is gone) are removed here instead.
 */
const TEMPORARY_ROOT: string = (() => {
  for (const name of readdirSync(tmpdir())) {
    const pid = /^cip-test-run-(\d+)$/.exec(name)?.[1];
    if (pid && !processExists(Number(pid))) rmSync(join(tmpdir(), name), { recursive: true, force: true });
  }
  const root = join(tmpdir(), `cip-test-run-${process.pid}`);
  mkdirSync(root, { recursive: true });
  return root;
})();

/** A fresh temporary folder (under one folder per test process, removed by a later run). */
export function tempDir(prefix: string): string {
  return mkdtempSync(join(TEMPORARY_ROOT, `${prefix}-`));
}

/**
 * Whether a command line tool is installed. Under `CI=true` a missing tool throws (a failure, never a
 * skip); otherwise the caller skips with the returned message.
 */
export function requireTool(tool: string): string | undefined {
  try {
    execFileSync(tool, ["--version"], { stdio: "ignore" });
    return undefined;
  } catch {
    if (IN_CI) throw new Error(`${tool} is not installed: run .ci/setup`);
    return `${tool} is not installed (run .ci/setup)`;
  }
}

/** Compresses with the `zstd` command line tool. */
export function zstd(data: Uint8Array): Uint8Array {
  return new Uint8Array(execFileSync("zstd", ["-q", "-c", "-3", "--no-check"], { input: data }));
}

/** Compresses with gzip (deterministic: no name, no time). */
export function gzip(data: Uint8Array): Uint8Array {
  return new Uint8Array(gzipSync(data, { level: 6 }));
}

/** A layer to put in a layout: its blob bytes, media type and uncompressed tar. */
export interface LayoutLayer {
  blob: Uint8Array;
  mediaType: string;
  tar: Uint8Array;
}

/** The OCI layer media types, by compression. */
export const LAYER_TYPES = {
  none: "application/vnd.oci.image.layer.v1.tar",
  gzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  zstd: "application/vnd.oci.image.layer.v1.tar+zstd",
} as const;

/** Makes a layer from a tar archive with the given compression. */
export function layer(tarBytes: Uint8Array, compression: "none" | "gzip" | "zstd"): LayoutLayer {
  const blob = compression === "gzip" ? gzip(tarBytes) : compression === "zstd" ? zstd(tarBytes) : tarBytes;
  return { blob, mediaType: LAYER_TYPES[compression], tar: tarBytes };
}

/** Writes a single-image OCI layout tagged `tag`; returns the manifest digest. */
export function writeOciLayout(
  dir: string,
  layers: LayoutLayer[],
  options: { tag?: string; diffIds?: string[] } = {},
): { manifestDigest: string; configDigest: string } {
  const blobs = join(dir, "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  const put = (data: Uint8Array | string) => {
    const digest = digestOf(data);
    writeFileSync(join(blobs, digest.slice(7)), data);
    return { digest, size: typeof data === "string" ? new TextEncoder().encode(data).length : data.length };
  };
  const layerDescriptors = layers.map((l) => ({ mediaType: l.mediaType, ...put(l.blob) }));
  const config = JSON.stringify({
    created: "2024-01-01T00:00:00Z",
    architecture: "amd64",
    os: "linux",
    config: { Cmd: ["/bin/sh"] },
    rootfs: { type: "layers", diff_ids: options.diffIds ?? layers.map((l) => digestOf(l.tar)) },
    history: layers.map(() => ({ created: "2024-01-01T00:00:00Z", created_by: "test" })),
  });
  const configDescriptor = { mediaType: "application/vnd.oci.image.config.v1+json", ...put(config) };
  const manifest = JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: configDescriptor,
    layers: layerDescriptors,
  });
  const m = put(manifest);
  writeFileSync(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    join(dir, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        ...m,
        annotations: { "org.opencontainers.image.ref.name": options.tag ?? "latest" },
      }],
    }),
  );
  return { manifestDigest: m.digest, configDigest: configDescriptor.digest };
}

function octal(value: number, length: number): string {
  return value.toString(8).padStart(length - 1, "0") + "\0";
}

/** One raw 512-byte tar header with any type flag (for PAX, GNU long names, devices, hostile names). */
export function rawHeader(
  fields: {
    name: string;
    type: string;
    size?: number;
    mode?: number;
    linkname?: string;
    magic?: "ustar" | "gnu";
  },
): Uint8Array {
  const enc = new TextEncoder();
  const header = new Uint8Array(512);
  const put = (text: string, offset: number, length: number) => {
    const bytes = enc.encode(text);
    header.set(bytes.subarray(0, length), offset);
  };
  put(fields.name, 0, 100);
  put(octal(fields.mode ?? 0o644, 8), 100, 8);
  put(octal(0, 8), 108, 8);
  put(octal(0, 8), 116, 8);
  put(octal(fields.size ?? 0, 12), 124, 12);
  put(octal(1700000000, 12), 136, 12);
  put("        ", 148, 8);
  put(fields.type, 156, 1);
  if (fields.linkname) put(fields.linkname, 157, 100);
  if (fields.magic === "gnu") put("ustar  \0", 257, 8);
  else {
    put("ustar\0", 257, 6);
    put("00", 263, 2);
  }
  let sum = 0;
  for (const byte of header) sum += byte;
  put(octal(sum, 7) + " ", 148, 8);
  return header;
}

/** Pads `data` to a whole number of 512-byte blocks. */
export function padded(data: Uint8Array | string): Uint8Array {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const out = new Uint8Array(Math.ceil(bytes.length / 512) * 512);
  out.set(bytes);
  return out;
}

/** Concatenates byte arrays (the library's own `concat`, spread). */
export function concatBytes(...parts: Uint8Array[]): Uint8Array {
  return concat(parts);
}

/** A PAX record `LENGTH KEY=VALUE\n`, its length counting itself. */
export function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let length = new TextEncoder().encode(body).length + 1;
  while (String(length).length + new TextEncoder().encode(body).length !== length) length++;
  return `${length}${body}`;
}

/** A Web stream of `data`, in chunks of `chunkSize` bytes (to exercise reassembly). */
export function streamOf(data: Uint8Array, chunkSize = 1000): ReadableStream<Uint8Array> {
  let offset = 0;
  return new ReadableStream({
    pull(controller) {
      if (offset >= data.length) return controller.close();
      controller.enqueue(data.slice(offset, offset + chunkSize));
      offset += chunkSize;
    },
  });
}
