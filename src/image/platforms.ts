/**
 * The platforms of a multi-arch image, and opening the one a caller names.
 *
 * The proxy resolves a manifest list to one instance per process (`--override-os/-arch/-variant`, or the
 * machine's own platform), and its protocol cannot return the list itself. So the list comes from
 * `skopeo inspect --raw REF`, run with the same configuration as the proxy (the same command prefix,
 * global flags, auth file, certificates and TLS setting, built by the same `skopeoArgv`); in-memory
 * credentials (`authData`) reach it through a pipe on its standard input, never on a command line or in
 * the environment. A platform is then
 * opened through a proxy spawned with the matching override flags ({@linkcode platformConfig}).
 *
 * Cost: one `skopeo inspect` process per listing (about as long as spawning a proxy plus one manifest
 * fetch; two for a single-platform image, whose platform is in its configuration), and one proxy process
 * per platform opened.
 *
 * @module
 * @tags allow-run
 */

import { spawn } from "node:child_process";
import process from "node:process";
import { createHash } from "node:crypto";
import { authDataBytes, type ImageProxyConfig, skopeoArgv } from "../config.ts";
import { cannotStart, ImageProxyError } from "../errors.ts";
import { type ImageReferenceLike, toImageReference } from "../reference.ts";

/** One platform an image is available for. */
export interface ImagePlatform {
  /** Operating system (`linux`). */
  os: string;
  /** CPU architecture (`arm64`). */
  architecture: string;
  /** CPU variant (`v8`), when the image names one. */
  variant?: string;
  /** The digest of that platform's manifest. */
  digest: string;
}

/** A platform as a caller names it: `linux/arm64/v8`. */
export type PlatformName = Pick<ImagePlatform, "os" | "architecture" | "variant">;

/** A platform string that is not `OS/ARCH` or `OS/ARCH/VARIANT`. */
export class InvalidPlatformError extends ImageProxyError {
  /** The string as given. */
  readonly platform: string;
  /** Creates the error for `platform`. */
  constructor(platform: string) {
    super(`Invalid platform "${platform}": expected OS/ARCH or OS/ARCH/VARIANT, like "linux/arm64/v8"`);
    this.name = "InvalidPlatformError";
    this.platform = platform;
  }
}

/** `skopeo inspect` failed. */
export class InspectError extends ImageProxyError {
  /** The last lines skopeo wrote to standard error. */
  readonly stderrTail: string;
  /** Creates the error for `reference`, with skopeo's last words. */
  constructor(reference: string, stderrTail: string, detail?: string) {
    const tail = stderrTail.trim().split("\n").slice(-3).join("; ");
    super(`Cannot list the platforms of "${reference}": ${detail ?? (tail || "skopeo inspect failed")}`);
    this.name = "InspectError";
    this.stderrTail = stderrTail;
  }
}

const PART = /^[A-Za-z0-9_.-]+$/;

/**
 * Parses `OS/ARCH[/VARIANT]`.
 *
 * @throws {InvalidPlatformError} for anything else.
 */
export function parsePlatform(text: string): PlatformName {
  const parts = text.split("/");
  if (parts.length < 2 || parts.length > 3 || !parts.every((p) => PART.test(p))) {
    throw new InvalidPlatformError(text);
  }
  const [os, architecture, variant] = parts;
  return variant === undefined ? { os, architecture } : { os, architecture, variant };
}

/** `os/arch[/variant]`. */
export function formatPlatform(platform: PlatformName): string {
  return [platform.os, platform.architecture, platform.variant].filter((p) => p).join("/");
}

/**
 * `config` with the override flags that make a proxy resolve a manifest list to `platform`: spawn an
 * {@linkcode ImageProxy} with it and open the image as usual.
 *
 * @example Reading a file of the arm64 instance of a multi-arch image
 * ```ts ignore
 * import { ImageProxy } from "jsr:@cip/containers-image-proxy";
 * import { parsePlatform, platformConfig, readFile } from "jsr:@cip/containers-image-proxy/inspect";
 *
 * await using proxy = await ImageProxy.spawn(platformConfig({}, parsePlatform("linux/arm64/v8")));
 * const img = await proxy.openImage("docker://quay.io/libpod/alpine:latest");
 * const release = await new Response(await readFile(proxy, img, "/etc/os-release")).text();
 * ```
 */
export function platformConfig(config: ImageProxyConfig, platform: PlatformName): ImageProxyConfig {
  const { overrideVariant: _, ...rest } = config;
  return {
    ...rest,
    overrideOs: platform.os,
    overrideArch: platform.architecture,
    ...(platform.variant ? { overrideVariant: platform.variant } : {}),
  };
}

/**
 * The `skopeo inspect --raw` command line for `reference` with `config`'s settings: the proxy's own
 * command line from `skopeoArgv`, with `inspect` in place of `experimental-image-proxy` and without the
 * socket. `authData` is read from standard input. Pure.
 */
export function inspectArgv(config: ImageProxyConfig, reference: string, extra: string[] = []): string[] {
  const proxy = skopeoArgv(config, { sockfd: 0, authfd: config.authData === undefined ? undefined : 0 });
  const at = proxy.indexOf("experimental-image-proxy", config.skopeoCmd?.length ?? 5);
  const flags: string[] = [];
  const tail = proxy.slice(at + 1, -2); // Without "--sockfd N".
  for (let i = 0; i < tail.length; i++) {
    if (tail[i] === "--decryption-key") i++; // inspect decrypts nothing.
    else flags.push(tail[i]);
  }
  return [...proxy.slice(0, at), "inspect", ...flags, ...extra, reference];
}

const MAX_OUTPUT = 16 << 20;

function runInspect(config: ImageProxyConfig, reference: string, extra: string[]): Promise<Uint8Array> {
  const argv = inspectArgv(config, reference, extra);
  const auth = authDataBytes(config.authData);
  return new Promise((resolve, reject) => {
    let child: ReturnType<typeof spawn>;
    try {
      // skopeo opens /proc/self/fd/0, which works on a pipe but not on the socket Bun gives a child
      // as its stdin: `cat` moves the bytes into a real pipe. Neither command line holds the secret.
      const command = auth === undefined ? argv : ["sh", "-c", 'cat | "$@"', "sh", ...argv];
      child = spawn(command[0], command.slice(1), {
        stdio: [auth === undefined ? "ignore" : "pipe", "pipe", "pipe"],
        env: config.env ? { ...process.env, ...config.env } : undefined,
      });
    } catch (err) {
      return reject(cannotStart(argv, err));
    }
    const out: Uint8Array[] = [];
    let length = 0;
    let stderr = "";
    child.on("error", (err) => reject(cannotStart(argv, err)));
    child.stdout!.on("data", (chunk: Uint8Array) => {
      length += chunk.length;
      if (length > MAX_OUTPUT) child.kill();
      else out.push(chunk);
    });
    child.stderr!.on("data", (chunk: Uint8Array) => {
      stderr = (stderr + new TextDecoder().decode(chunk)).slice(-4096);
    });
    if (auth !== undefined) {
      child.stdin!.on("error", () => {}); // skopeo may not read it at all (an oci: reference).
      child.stdin!.end(auth);
    }
    child.on("close", (code) => {
      if (length > MAX_OUTPUT) {
        return reject(new InspectError(reference, "", "skopeo inspect printed too much"));
      }
      if (code !== 0) return reject(new InspectError(reference, stderr));
      const bytes = new Uint8Array(length);
      let offset = 0;
      for (const chunk of out) {
        bytes.set(chunk, offset);
        offset += chunk.length;
      }
      resolve(bytes);
    });
  });
}

interface RawManifest {
  mediaType?: string;
  manifests?: { digest?: unknown; platform?: { os?: unknown; architecture?: unknown; variant?: unknown } }[];
}

function parseJson(reference: string, bytes: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw new InspectError(reference, "", "skopeo inspect did not print JSON");
  }
}

/**
 * The platforms `reference` is available for: every entry of its manifest list or image index that
 * names a platform, or, for a single-platform image, that one platform (from its configuration).
 *
 * @example Listing the platforms of an image
 * ```ts ignore
 * import { listPlatforms } from "jsr:@cip/containers-image-proxy/inspect";
 * for (const p of await listPlatforms({}, "docker://quay.io/libpod/alpine:latest")) {
 *   console.log(`${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ""}`, p.digest);
 * }
 * ```
 *
 * @param config the proxy configuration whose settings `skopeo inspect` gets.
 * @param reference the image.
 * @returns the platforms, in the list's order.
 * @throws {InspectError} when skopeo fails; `SpawnError` when it cannot be started.
 */
export async function listPlatforms(
  config: ImageProxyConfig,
  reference: ImageReferenceLike,
): Promise<ImagePlatform[]> {
  const ref = toImageReference(reference).toString();
  const raw = await runInspect(config, ref, ["--raw"]);
  const manifest = parseJson(ref, raw) as RawManifest;
  if (Array.isArray(manifest?.manifests)) {
    return manifest.manifests.flatMap((m) => {
      const p = m.platform;
      if (typeof m.digest !== "string" || typeof p?.os !== "string" || typeof p.architecture !== "string") {
        return [];
      }
      const platform: ImagePlatform = { os: p.os, architecture: p.architecture, digest: m.digest };
      if (typeof p.variant === "string" && p.variant !== "") platform.variant = p.variant;
      return [platform];
    });
  }
  const config_ = parseJson(ref, await runInspect(config, ref, ["--config", "--raw"])) as {
    os?: unknown;
    architecture?: unknown;
    variant?: unknown;
  };
  if (typeof config_?.os !== "string" || typeof config_.architecture !== "string") {
    throw new InspectError(ref, "", "the image's configuration names no platform");
  }
  const platform: ImagePlatform = {
    os: config_.os,
    architecture: config_.architecture,
    digest: `sha256:${createHash("sha256").update(raw).digest("hex")}`,
  };
  if (typeof config_.variant === "string" && config_.variant !== "") platform.variant = config_.variant;
  return [platform];
}
