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
import http from "node:http";
import https from "node:https";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IN_CI } from "./env.ts";

/** The kinds of registry the tests use. `auth` is TLS plus htpasswd basic auth. */
export type RegistryVariant = "plain" | "tls" | "auth";

/** A running registry. */
export interface Registry {
  variant: RegistryVariant;
  /** `127.0.0.1:PORT`, the registry part of a docker reference. */
  host: string;
  port: number;
  /** `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`. */
  url: string;
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
  /** An HTTP GET against the registry API (`/v2/...`), with credentials and CA where needed. */
  get(path: string, headers?: Record<string, string>): Promise<HttpResponse>;
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

/** An HTTP response, read to the end. */
export interface HttpResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Uint8Array;
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
let sharedCa: { dir: string; caPem: string; caKey: string; caCrt: string } | undefined;

/** The registry of `variant`, started on first use and shared afterwards. */
export function registry(variant: RegistryVariant): Promise<Registry> {
  if (REGISTRY_UNAVAILABLE) return Promise.reject(new Error(`Registry unavailable: ${REGISTRY_UNAVAILABLE}`));
  let promise = started.get(variant);
  if (!promise) {
    promise = startWithRetries(variant);
    started.set(variant, promise);
    // A failed start is not cached: the next test gets a fresh attempt and its own error.
    promise.catch(() => started.delete(variant));
  }
  return promise;
}

/** Stops every registry started here and removes its files. For `after()`. */
export async function stopRegistries(): Promise<void> {
  const all = [...started.values()];
  started.clear();
  await Promise.allSettled(all.map(async (p) => (await p).stop()));
  for (const r of [...running]) await r.stop();
  if (sharedCa) {
    rmSync(sharedCa.dir, { recursive: true, force: true });
    sharedCa = undefined;
  }
}

// Last resort when after() never runs (an uncaught error ends the run): kill and clean up synchronously.
process.on("exit", () => {
  for (const r of running) {
    try {
      process.kill(r.pid, "SIGKILL");
    } catch { /* already gone */ }
    rmSync(r.dir, { recursive: true, force: true });
  }
  if (sharedCa) rmSync(sharedCa.dir, { recursive: true, force: true });
});

/** A port that was free a moment ago; the registry may still lose it to another process. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => port ? resolve(port) : reject(new Error("No port from the kernel")));
    });
  });
}

class AddressInUse extends Error {}

async function startWithRetries(variant: RegistryVariant): Promise<Running> {
  let lastError: unknown;
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      return await start(variant, await freePort());
    } catch (err) {
      // Someone took the port between our probe and the registry's bind: pick another one.
      if (!(err instanceof AddressInUse)) throw err;
      lastError = err;
    }
  }
  throw lastError;
}

function openssl(args: string[], cwd: string): void {
  execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"] });
}

/** A throwaway CA (EC P-256: fast to generate), shared by the TLS variants of one run. */
function certificateAuthority(): NonNullable<typeof sharedCa> {
  if (sharedCa) return sharedCa;
  const dir = mkdtempSync(join(tmpdir(), "cip-registry-ca-"));
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

async function start(variant: RegistryVariant, port: number): Promise<Running> {
  const dir = mkdtempSync(join(tmpdir(), `cip-registry-${variant}-`));
  let child: ReturnType<typeof spawn> | undefined;
  try {
    const tls = variant !== "plain";
    const instance = randomUUID();
    const lines = [
      "version: 0.1",
      "log:",
      "  level: error",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${join(dir, "storage")}`,
      "  delete:",
      "    enabled: true",
      "http:",
      `  addr: 127.0.0.1:${port}`,
      `  secret: ${randomUUID()}`,
      // Tells our registry apart from whatever else might answer on the port.
      "  headers:",
      `    X-Cip-Instance: [${instance}]`,
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

    // setpriv ties the registry's life to ours even when the test runner is killed outright.
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
    exited.then(() => hasExited = true);
    await new Promise<void>((resolve, reject) => {
      proc.once("spawn", () => resolve());
      proc.once("error", reject);
    });
    const pid = proc.pid!;

    const url = `${tls ? "https" : "http"}://127.0.0.1:${port}`;
    const auth = variant === "auth"
      ? `Basic ${Buffer.from(`${USERNAME}:${PASSWORD}`).toString("base64")}`
      : undefined;
    const get = (path: string, headers: Record<string, string> = {}) =>
      httpGet(url + path, { ...headers, ...(auth ? { authorization: auth } : {}) }, caPem);

    // Ready when *this* registry answers /v2/ (200, or 401 before credentials); no fixed sleeps.
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (hasExited) {
        await exited;
        if (/address already in use/.test(output)) throw new AddressInUse(output);
        throw new Error(`docker-registry (${variant}) exited during startup: ${output.trim()}`);
      }
      const response = await get("/v2/").catch(() => undefined);
      if (response && response.headers["x-cip-instance"] === instance) {
        if (response.status !== 200) {
          throw new Error(`docker-registry (${variant}) answered /v2/ with ${response.status}`);
        }
        break;
      }
      if (Date.now() > deadline) {
        throw new Error(`docker-registry (${variant}) not ready after 15 s: ${output.trim()}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }

    const host = `127.0.0.1:${port}`;
    const pushes = new Map<string, Promise<void>>();
    const registryObject: Running = {
      variant,
      host,
      port,
      url,
      dir,
      certDir,
      caPem,
      username: variant === "auth" ? USERNAME : undefined,
      password: variant === "auth" ? PASSWORD : undefined,
      pid,
      ref: (repository) => `docker://${host}/${repository}`,
      get,
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
          ...(certDir ? ["--dest-cert-dir", certDir] : ["--dest-tls-verify=false"]),
          // Credentials on argv are acceptable for this test-only copy, never in the library.
          ...(variant === "auth" ? ["--dest-creds", `${USERNAME}:${PASSWORD}`] : []),
          ...(options.copyArgs ?? []),
          source,
          `docker://${host}/${repository}`,
        ];
        const key = JSON.stringify([skopeo, args]);
        let push = pushes.get(key);
        if (!push) {
          push = run(skopeo[0], args);
          pushes.set(key, push);
        }
        return push;
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
        rmSync(dir, { recursive: true, force: true });
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
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

/** Runs a command to completion; its stderr becomes the error message. */
function run(command: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { maxBuffer: 16 << 20 }, (err, _stdout, stderr) => {
      if (err) {
        reject(new Error(`${command} ${args.join(" ")} failed: ${String(stderr).trim() || err.message}`));
      } else resolve();
    });
  });
}

/** `skopeo ARGS` with the output captured (for `generate-sigstore-key` and the like). */
export function runCommand(argv: string[]): Promise<void> {
  return run(argv[0], argv.slice(1));
}

function httpGet(
  url: string,
  headers: Record<string, string>,
  ca: string | undefined,
): Promise<HttpResponse> {
  return new Promise((resolve, reject) => {
    const client = url.startsWith("https:") ? https : http;
    const request = client.get(url, {
      headers: { ...headers, connection: "close" },
      agent: false,
      ...(ca ? { ca } : {}),
      timeout: 5000,
    }, (response) => {
      const chunks: Buffer[] = [];
      response.on("data", (chunk: Buffer) => chunks.push(chunk));
      response.on("end", () =>
        resolve({
          status: response.statusCode ?? 0,
          headers: response.headers,
          body: new Uint8Array(Buffer.concat(chunks)),
        }));
      response.on("error", reject);
    });
    request.on("timeout", () => request.destroy(new Error(`GET ${url} timed out`)));
    request.on("error", reject);
  });
}
