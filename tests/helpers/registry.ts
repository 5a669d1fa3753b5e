/**
 * Real Distribution registries (`docker-registry serve`) for the integration tests, on 127.0.0.1 only:
 * plain HTTP, TLS with a throwaway CA, and TLS with htpasswd basic auth. Each variant starts once, on
 * first use, on an ephemeral port with its own temp storage, and is shared by every test of the file;
 * {@linkcode stopRegistries} (an `after()` hook) stops them and removes their files, and an exit
 * handler plus a parent-death signal cover runs that end abnormally.
 */

import { execFile, execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IN_CI, readProcFile } from "./env.ts";

/** The kinds of registry the tests use. `auth` is TLS plus htpasswd basic auth. */
export type RegistryVariant = "plain" | "tls" | "auth";

/** A running registry. */
export interface Registry {
  variant: RegistryVariant;
  /** `127.0.0.1:PORT`, the registry part of a docker reference. */
  host: string;
  port: number;
  /** The registry's temp folder (config, storage, certificates). */
  dir: string;
  /** A folder holding only `ca.crt`, for `--cert-dir` (TLS variants). */
  certDir?: string;
  /** The CA certificate in PEM (TLS variants). */
  caPem?: string;
  /** Basic auth credentials (the `auth` variant). */
  username?: string;
  password?: string;
  /** The pid of the registry's process. */
  pid: number;
  /** `docker://127.0.0.1:PORT/REPO` for `repository` (`app:latest`). */
  ref(repository: string): string;
  /**
   * Copies `source` (any containers/image reference) to `repository` here with the system skopeo (or
   * `options.skopeo`), once per destination and argument list; later calls share the first copy.
   */
  push(source: string, repository: string, options?: PushOptions): Promise<void>;
  /**
   * The manifest stored under `reference` (`REPO:TAG`) byte for byte, as the registry serves it
   * (`skopeo inspect --raw`, which neither converts nor picks an instance).
   */
  rawManifest(reference: string): Promise<Uint8Array>;
}

/** Options for {@linkcode Registry.push}. */
export interface PushOptions {
  /** The skopeo binary to copy with (default: the system `skopeo`). */
  skopeo?: string[];
  /** Extra global options, before `copy`. */
  globalArgs?: string[];
  /** Extra `copy` options (`--all`, `--format v2s2`, `--sign-by-sigstore-private-key ...`). */
  copyArgs?: string[];
}

/** The tools the registry tests need, with what is missing. */
const TOOLS = [
  ["docker-registry", "--version"],
  ["htpasswd", "-h"],
  ["openssl", "version"],
  ["setpriv", "--version"],
] as const;

function toolMissing(argv: readonly string[]): boolean {
  try {
    execFileSync(argv[0], argv.slice(1), { stdio: "ignore" });
    return false;
  } catch (err) {
    // `htpasswd -h` exits 2 after printing its usage; only "not found" means missing.
    return (err as { code?: string }).code === "ENOENT";
  }
}

/**
 * Why the registry tests cannot run here (a missing tool), or `undefined`. Under `CI=true` a missing
 * tool is an error, not a reason to skip.
 */
export const REGISTRY_UNAVAILABLE: string | undefined = (() => {
  const missing = TOOLS.filter((argv) => toolMissing(argv)).map((argv) => argv[0]);
  if (missing.length === 0) return undefined;
  const reason = `${missing.join(", ")} not installed (run .ci/setup)`;
  if (IN_CI) throw new Error(`Registry tests need ${reason}`);
  // deno-lint-ignore no-console -- a skipped suite must say why, like SERVERS does
  console.warn(`Skipping registry tests: ${reason}`);
  return reason;
})();

const USERNAME = "cip-tester";
/** A random password per run: a secret that can only come from the test. */
const PASSWORD = `pw-${randomUUID()}`;

interface Running extends Registry {
  stop(): Promise<void>;
}

const started = new Map<RegistryVariant, Promise<Running>>();
const running = new Set<Running>();
/** Every temp folder and registry pid not yet cleaned up, including those of a start in progress. */
const tempDirs = new Set<string>();
const livePids = new Set<number>();
let sharedCa: { dir: string; caPem: string; caKey: string; caCrt: string } | undefined;

/**
 * The registry of `variant`, started on first use and shared afterwards. A failed start is remembered:
 * every later test fails at once with the same error instead of waiting for its own timeout.
 */
export function registry(variant: RegistryVariant): Promise<Registry> {
  if (REGISTRY_UNAVAILABLE) return Promise.reject(new Error(`Registry unavailable: ${REGISTRY_UNAVAILABLE}`));
  let promise = started.get(variant);
  if (!promise) {
    promise = start(variant);
    started.set(variant, promise);
  }
  return promise;
}

/** Stops every registry started here and removes every temp folder. For `after()`. */
export async function stopRegistries(): Promise<void> {
  const all = [...started.values()];
  started.clear();
  await Promise.allSettled(all.map(async (p) => (await p).stop()));
  for (const r of [...running]) await r.stop();
  sharedCa = undefined;
  for (const dir of [...tempDirs]) removeTempDir(dir);
}

/**
 * Last resort when after() never runs: kills and cleans up synchronously. Deno's `deno test` skips a
 * top-level after() whose last test was filtered out and never emits process "exit", but it does
 * dispatch "unload"; Bun emits "exit".
 */
function cleanUpNow(): void {
  for (const pid of livePids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch { /* already gone */ }
  }
  livePids.clear();
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}
process.on("exit", cleanUpNow);
(globalThis as { addEventListener?: (type: string, listener: () => void) => void }).addEventListener?.(
  "unload",
  cleanUpNow,
);

function makeTempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

function removeTempDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

/** A temp folder removed by {@linkcode stopRegistries}, or at exit if that never runs. */
export function tempDir(prefix: string): string {
  return makeTempDir(prefix);
}

function openssl(args: string[], cwd: string): void {
  execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"] });
}

/** A throwaway CA (EC P-256: fast to generate), shared by the TLS variants of one run. */
function certificateAuthority(): NonNullable<typeof sharedCa> {
  if (sharedCa) return sharedCa;
  const dir = makeTempDir("cip-registry-ca-");
  openssl([
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
    "-days",
    "2",
    "-subj",
    "/CN=containers-image-proxy test CA",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  ], dir);
  sharedCa = {
    dir,
    caPem: readFileSync(join(dir, "ca.crt"), "utf8"),
    caKey: join(dir, "ca.key"),
    caCrt: join(dir, "ca.crt"),
  };
  return sharedCa;
}

/** A server certificate for 127.0.0.1 and localhost, signed by the test CA, in `dir`. */
function serverCertificate(dir: string): { cert: string; key: string } {
  const ca = certificateAuthority();
  writeFileSync(
    join(dir, "server.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n" +
      "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
  );
  openssl([
    "req",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
    "server.key",
    "-out",
    "server.csr",
    "-subj",
    "/CN=127.0.0.1",
  ], dir);
  openssl([
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    ca.caCrt,
    "-CAkey",
    ca.caKey,
    "-set_serial",
    String(Date.now()),
    "-days",
    "2",
    "-extfile",
    "server.ext",
    "-out",
    "server.crt",
  ], dir);
  return { cert: join(dir, "server.crt"), key: join(dir, "server.key") };
}

async function start(variant: RegistryVariant): Promise<Running> {
  const dir = makeTempDir(`cip-registry-${variant}-`);
  let child: ReturnType<typeof spawn> | undefined;
  try {
    const tls = variant !== "plain";
    const lines = [
      "version: 0.1",
      "log:",
      "  level: error",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${join(dir, "storage")}`,
      "http:",
      // Port 0: the kernel hands the registry a free port as it binds, so nothing can take the port
      // between a probe and the bind (no retries needed); it is read back from /proc below.
      "  addr: 127.0.0.1:0",
      `  secret: ${randomUUID()}`,
    ];
    let certDir: string | undefined;
    let caPem: string | undefined;
    if (tls) {
      const { cert, key } = serverCertificate(dir);
      lines.push("  tls:", `    certificate: ${cert}`, `    key: ${key}`);
      certDir = join(dir, "certs.d");
      mkdirSync(certDir);
      caPem = certificateAuthority().caPem;
      writeFileSync(join(certDir, "ca.crt"), caPem);
    }
    if (variant === "auth") {
      const entry = execFileSync("htpasswd", ["-Bbn", USERNAME, PASSWORD], { encoding: "utf8" });
      writeFileSync(join(dir, "htpasswd"), entry);
      lines.push("auth:", "  htpasswd:", "    realm: cip-test", `    path: ${join(dir, "htpasswd")}`);
    }
    writeFileSync(join(dir, "config.yml"), lines.join("\n") + "\n");

    // setpriv ties the registry's life to ours even when the test runner is killed outright; it execs
    // docker-registry, so the pid is the registry's.
    const proc = spawn(
      "setpriv",
      ["--pdeathsig", "SIGTERM", "--", "docker-registry", "serve", join(dir, "config.yml")],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    child = proc;
    let output = "";
    const keep = (chunk: Buffer | string) => {
      output = (output + chunk.toString()).slice(-8192);
    };
    proc.stdout!.on("data", keep);
    proc.stderr!.on("data", keep);
    const exited = new Promise<number | null>((resolve) => proc.once("exit", (code) => resolve(code)));
    let hasExited = false;
    await new Promise<void>((resolve, reject) => {
      proc.once("spawn", () => resolve());
      proc.once("error", reject);
    });
    const pid = proc.pid!;
    livePids.add(pid);
    exited.then(() => {
      hasExited = true;
      livePids.delete(pid);
    });

    // Ready once the registry's own socket listens: Go's HTTP server serves every connection from
    // then on. Polled, no fixed sleeps; a registry that cannot start (bad certificate, bad config)
    // exits and says why. (Not node:net plus GET /v2/: Deno would need --allow-net for that.)
    const deadline = Date.now() + 15_000;
    let port: number | undefined;
    for (;;) {
      if (hasExited) {
        await exited;
        throw new Error(`docker-registry (${variant}) exited during startup: ${output.trim()}`);
      }
      port = listeningPort(pid);
      if (port !== undefined) break;
      if (Date.now() > deadline) {
        throw new Error(`docker-registry (${variant}) not listening after 15 s: ${output.trim()}`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }

    const host = `127.0.0.1:${port}`;
    /** How the system skopeo reaches this registry: TLS settings, and credentials for `auth`. */
    const access = (direction: "dest" | "") => {
      const flag = (name: string) => direction ? `--${direction}-${name}` : `--${name}`;
      return [
        ...(certDir ? [flag("cert-dir"), certDir] : [`${flag("tls-verify")}=false`]),
        // Credentials on argv are acceptable for this test-only setup, never in the library.
        ...(variant === "auth" ? [flag("creds"), `${USERNAME}:${PASSWORD}`] : []),
      ];
    };
    const pushes = new Map<string, Promise<void>>();
    const registryObject: Running = {
      variant,
      host,
      port,
      dir,
      certDir,
      caPem,
      username: variant === "auth" ? USERNAME : undefined,
      password: variant === "auth" ? PASSWORD : undefined,
      pid,
      ref: (repository) => `docker://${host}/${repository}`,
      push(source, repository, options = {}) {
        const skopeo = options.skopeo ?? ["skopeo"];
        const args = [
          ...skopeo.slice(1),
          "--insecure-policy",
          ...(options.globalArgs ?? []),
          "copy",
          "-q",
          "--retry-times",
          "0",
          ...access("dest"),
          ...(options.copyArgs ?? []),
          source,
          `docker://${host}/${repository}`,
        ];
        const key = JSON.stringify([skopeo, args]);
        let push = pushes.get(key);
        if (!push) {
          push = run(skopeo[0], args).then(() => {}, (err: Error) => {
            throw new Error(`${err.message}\ndocker-registry (${variant}) said: ${output.trim()}`);
          });
          pushes.set(key, push);
        }
        return push;
      },
      async rawManifest(reference) {
        const args = [
          "inspect",
          "--raw",
          "--retry-times",
          "0",
          ...access(""),
          `docker://${host}/${reference}`,
        ];
        return new Uint8Array(await run("skopeo", args));
      },
      async stop() {
        if (!running.has(registryObject)) return;
        running.delete(registryObject);
        if (!hasExited) {
          proc.kill("SIGTERM");
          const timer = setTimeout(() => proc.kill("SIGKILL"), 5000);
          await exited;
          clearTimeout(timer);
        }
        removeTempDir(dir);
      },
    };
    running.add(registryObject);
    return registryObject;
  } catch (err) {
    if (child && child.exitCode === null && child.signalCode === null) {
      const proc = child;
      const gone = new Promise((resolve) => proc.once("exit", resolve));
      proc.kill("SIGKILL");
      await gone;
    }
    removeTempDir(dir);
    throw err;
  }
}

/** Runs a command to completion and returns its stdout; its stderr becomes the error message. */
function run(command: string, args: string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { maxBuffer: 16 << 20, encoding: "buffer" }, (err, stdout, stderr) => {
      if (err) {
        reject(new Error(`${command} ${args.join(" ")} failed: ${stderr.toString().trim() || err.message}`));
      } else resolve(stdout);
    });
  });
}

/** Runs `argv` to completion (`skopeo generate-sigstore-key ...`); fails with its stderr. */
export async function runCommand(argv: string[]): Promise<void> {
  await run(argv[0], argv.slice(1));
}

/**
 * The 127.0.0.1 port that process `pid` listens on: its socket inodes matched against its
 * /proc/PID/net/tcp. Read through subprocesses, which Deno's /proc guard does not cover.
 */
function listeningPort(pid: number): number | undefined {
  let links: string;
  try {
    links = execFileSync("sh", ["-c", 'readlink /proc/"$1"/fd/* 2>/dev/null; true', "sh", String(pid)], {
      encoding: "utf8",
    });
  } catch {
    return undefined;
  }
  const inodes = new Set([...links.matchAll(/^socket:\[(\d+)\]$/gm)].map((m) => m[1]));
  if (inodes.size === 0) return undefined;
  let table: string;
  try {
    table = readProcFile(`/proc/${pid}/net/tcp`);
  } catch {
    return undefined;
  }
  for (const line of table.split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    // local_address is HEXIP:HEXPORT (127.0.0.1 is 0100007F), st 0A is LISTEN, field 9 the inode.
    if (fields.length < 10 || fields[3] !== "0A" || !inodes.has(fields[9])) continue;
    const [address, port] = fields[1].split(":");
    if (address !== "0100007F") throw new Error(`docker-registry listens on ${fields[1]}, not on loopback`);
    return parseInt(port, 16);
  }
  return undefined;
}
