/**
 * What every test file shares, whichever runtime runs it: the two real skopeo servers, fd counting,
 * and the rule that under `CI=true` a missing dependency fails instead of skipping.
 */

import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readlinkSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { concat } from "../../src/bytes.ts";

/** The project root. */
export const ROOT: string = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** The runtime running the tests. */
export const RUNTIME: "bun" | "deno" | "node" = "Bun" in globalThis
  ? "bun"
  : "Deno" in globalThis
  ? "deno"
  : "node";

/**
 * The command line that runs a TypeScript file under the runtime running the tests: Deno with
 * `denoFlags` (its permissions), Node through the `tsx` loader, Bun as is.
 */
export function scriptCommand(script: string, denoFlags: string[]): string[] {
  if (RUNTIME === "deno") return [process.execPath, "run", ...denoFlags, script];
  // Resolved here, so a child started in another folder still finds the loader.
  if (RUNTIME === "node") return [process.execPath, "--import", import.meta.resolve("tsx"), script];
  return [process.execPath, script];
}

/** Whether this is a CI run, where nothing may be skipped for lack of a dependency. */
export const IN_CI: boolean = process.env.CI === "true";

/** One real skopeo to test against. */
export interface Server {
  /** `skopeo 1.9.3`, `skopeo 1.22.0`. */
  name: string;
  /** The `skopeoCmd` that starts it, bound to our lifetime with setpriv. */
  skopeoCmd: string[];
  /** The protocol version it speaks. */
  protocol: string;
  /** The binary itself (for `skopeo copy` and friends). */
  binary: string[];
}

function probe(binary: string[]): string | undefined {
  try {
    const out = execFileSync(binary[0], [...binary.slice(1), "--version"], {
      encoding: "utf8",
      stdio: "pipe",
    });
    return /version (\S+)/.exec(out)?.[1];
  } catch {
    return undefined;
  }
}

const candidates: { binary: string[]; protocol: string }[] = [
  { binary: [process.env.SKOPEO_OLD ?? "skopeo"], protocol: "0.2.3" },
  { binary: [process.env.SKOPEO_NEW ?? join(ROOT, ".tools", "bin", "skopeo-1.22")], protocol: "0.2.8" },
];

/** The servers found on this machine. Under CI both must be present (`.ci/setup` installs them). */
export const SERVERS: Server[] = candidates.flatMap(({ binary, protocol }) => {
  const version = probe(binary);
  if (!version) {
    if (IN_CI) {
      throw new Error(`skopeo for protocol ${protocol} is missing (${binary.join(" ")}): run .ci/setup`);
    }
    // deno-lint-ignore no-console
    console.warn(`Skipping protocol ${protocol} tests: ${binary.join(" ")} is not installed (run .ci/setup)`);
    return [];
  }
  return [{
    name: `skopeo ${version}`,
    skopeoCmd: ["setpriv", "--pdeathsig", "SIGTERM", "--", ...binary],
    protocol,
    binary,
  }];
});

/** The newest server (protocol 0.2.8) or undefined. */
export const NEW_SERVER: Server | undefined = SERVERS.find((s) => s.protocol === "0.2.8");
/** The oldest server (protocol 0.2.3) or undefined. */
export const OLD_SERVER: Server | undefined = SERVERS.find((s) => s.protocol === "0.2.3");

type ReadlinkLib = { readlink(path: Uint8Array, buf: Uint8Array, size: bigint): number | bigint };
let denoLibc: ReadlinkLib | undefined;

/** readlink(2) through FFI: Deno guards /proc/self even from --allow-read, but not from --allow-ffi. */
function readlinkFfi(path: string): string | undefined {
  const Deno = (globalThis as unknown as {
    Deno?: { dlopen: (name: string, symbols: object) => { symbols: ReadlinkLib } };
  })
    .Deno!;
  denoLibc ??= Deno.dlopen("libc.so.6", {
    readlink: { parameters: ["buffer", "buffer", "usize"], result: "isize" },
  }).symbols;
  const buf = new Uint8Array(4096);
  const n = Number(denoLibc.readlink(new TextEncoder().encode(path + "\0"), buf, BigInt(buf.length)));
  return n < 0 ? undefined : new TextDecoder().decode(buf.subarray(0, n));
}

/** The open fds of this process, as `fd -> target`. */
export function openFds(): Map<number, string> {
  const fds = new Map<number, string>();
  // Deno alone guards /proc/self; any other runtime (Bun, Node) reads it with node:fs.
  if ("Deno" in globalThis) {
    for (let fd = 0; fd < 1024; fd++) {
      const target = readlinkFfi(`/proc/self/fd/${fd}`);
      if (target !== undefined) fds.set(fd, target);
    }
    return fds;
  }
  for (const name of readdirSync("/proc/self/fd")) {
    try {
      fds.set(Number(name), readlinkSync(`/proc/self/fd/${name}`));
    } catch { /* the fd used by readdir itself */ }
  }
  return fds;
}

/** Reads a /proc file of another process (Deno guards /proc from --allow-read; `cat` is not). */
export function readProcFile(path: string): string {
  return execFileSync("cat", [path], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
}

/**
 * Under Deno, a terminated worker's event loop (one eventfd and one epoll fd) stays open until the next
 * worker starts; the zstd decoder runs in a worker there. The library opens neither kind itself, and
 * tests/zstd_worker_test.ts checks that they do not pile up, so the fd checks pass over them.
 */
const DENO_WORKER_LOOP = "Deno" in globalThis;

/** Pipes, sockets and memfds opened since `before` (the kinds the library handles). */
export function leakedFds(before: Map<number, string>): string[] {
  const leaked: string[] = [];
  for (const [fd, target] of openFds()) {
    if (before.get(fd) === target) continue;
    if (DENO_WORKER_LOOP && /^anon_inode:\[(eventfd|eventpoll)\]$/.test(target)) continue;
    if (/^(pipe|socket|anon_inode|\/memfd)/.test(target)) leaked.push(`${fd} -> ${target}`);
  }
  return leaked;
}

/** Waits until `check` is true, polling; fails after `ms`. Never a fixed sleep. */
export async function waitFor(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`Timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Asserts that no fd of the library's kinds leaked; waits briefly for deferred closes. */
export async function assertNoLeakedFds(before: Map<number, string>): Promise<void> {
  const deadline = Date.now() + 2000;
  let leaked = leakedFds(before);
  while (leaked.length > 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
    leaked = leakedFds(before);
  }
  if (leaked.length > 0) throw new Error(`Leaked file descriptors:\n${leaked.join("\n")}`);
}

/** Whether process `pid` still exists (a reaped child does not). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return !/\) Z /.test(readProcFile(`/proc/${pid}/stat`));
  } catch {
    return false;
  }
}

/** Whether every thread of process `pid` is stopped (SIGSTOP reaches a running thread only later). */
export function processStopped(pid: number): boolean {
  const states = execFileSync("sh", ["-c", `cat /proc/${pid}/task/*/stat`], { encoding: "utf8" })
    .split("\n").filter((line) => line).map((line) =>
      line.slice(line.lastIndexOf(")") + 2, line.lastIndexOf(")") + 3)
    );
  return states.length > 0 && states.every((state) => state === "T");
}

/** Whether a file exists (re-exported for tests that need nothing else from node:fs). */
export { existsSync };

/** Reads a byte stream to its end. */
export async function readAll(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  for await (const chunk of stream) chunks.push(chunk);
  return concat(chunks);
}

/** Rejects with `what` when `promise` takes longer than `ms`: a deadlock fails the test instead of hanging it. */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`No progress within ${ms} ms: ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
