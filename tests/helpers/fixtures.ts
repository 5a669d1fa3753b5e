/**
 * Deterministic test images, built by the tests themselves: OCI layouts with real gzip'd tar layers,
 * a multi-arch index, a tampered layout, and the same image as oci-archive, docker-archive and dir
 * (converted with skopeo itself). Built once per run into a folder keyed by runtime.
 */

import { createHash } from "node:crypto";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { RUNTIME } from "./env.ts";

/** One tar entry for {@linkcode tar}. */
export interface TarEntry {
  name: string;
  type?: "file" | "dir" | "symlink" | "link";
  content?: string | Uint8Array;
  mode?: number;
  linkname?: string;
}

function octal(value: number, length: number): string {
  return value.toString(8).padStart(length - 1, "0") + "\0";
}

/** A ustar archive of `entries`, fixed owner and mtime, so the bytes are reproducible. */
export function tar(entries: TarEntry[]): Uint8Array {
  const blocks: Uint8Array[] = [];
  const enc = new TextEncoder();
  for (const entry of entries) {
    const content = typeof entry.content === "string"
      ? enc.encode(entry.content)
      : entry.content ?? new Uint8Array();
    const header = new Uint8Array(512);
    const put = (text: string, offset: number, length: number) => {
      const bytes = enc.encode(text);
      if (bytes.length > length) throw new Error(`tar field too long: ${text}`);
      header.set(bytes, offset);
    };
    let name = entry.name;
    let prefix = "";
    if (enc.encode(name).length > 100) {
      const cut = name.lastIndexOf("/", 154);
      prefix = name.slice(0, cut);
      name = name.slice(cut + 1);
    }
    const type = entry.type ?? "file";
    put(name, 0, 100);
    put(octal(entry.mode ?? (type === "dir" ? 0o755 : 0o644), 8), 100, 8);
    put(octal(0, 8), 108, 8);
    put(octal(0, 8), 116, 8);
    put(octal(type === "file" ? content.length : 0, 12), 124, 12);
    put(octal(1700000000, 12), 136, 12);
    put("        ", 148, 8);
    put({ file: "0", link: "1", symlink: "2", dir: "5" }[type], 156, 1);
    if (entry.linkname) put(entry.linkname, 157, 100);
    put("ustar\0", 257, 6);
    put("00", 263, 2);
    put(prefix, 345, 155);
    let sum = 0;
    for (const byte of header) sum += byte;
    put(octal(sum, 7) + " ", 148, 8);
    blocks.push(header);
    if (type === "file" && content.length > 0) {
      const padded = new Uint8Array(Math.ceil(content.length / 512) * 512);
      padded.set(content);
      blocks.push(padded);
    }
  }
  blocks.push(new Uint8Array(1024));
  const total = blocks.reduce((n, b) => n + b.length, 0);
  const out = new Uint8Array(total);
  let offset = 0;
  for (const block of blocks) {
    out.set(block, offset);
    offset += block.length;
  }
  return out;
}

/** `sha256:<hex>` of `data`. */
export function sha256(data: Uint8Array | string): string {
  return "sha256:" + createHash("sha256").update(data).digest("hex");
}

/** A deterministic pseudo-random byte string (incompressible test content). */
export function noise(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** A blob written into a layout. */
export interface BlobInfo {
  digest: string;
  size: number;
  mediaType: string;
}

function writeBlob(layout: string, data: Uint8Array | string, mediaType: string): BlobInfo {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const digest = sha256(bytes);
  const dir = join(layout, "blobs", "sha256");
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, digest.slice(7)), bytes);
  return { digest, size: bytes.length, mediaType };
}

/** A built single-platform image inside a layout. */
export interface BuiltImage {
  manifest: BlobInfo;
  manifestBytes: Uint8Array;
  config: BlobInfo;
  configBytes: Uint8Array;
  layers: (BlobInfo & { data: Uint8Array; diffId: string })[];
  architecture: string;
}

/** Writes one image (config + gzip'd tar layers + manifest) into `layout`'s blobs. */
export function writeImage(layout: string, layerEntries: TarEntry[][], architecture = "amd64"): BuiltImage {
  const layers = layerEntries.map((entries) => {
    const raw = tar(entries);
    const gz = gzipSync(raw, { level: 6 });
    const info = writeBlob(layout, gz, "application/vnd.oci.image.layer.v1.tar+gzip");
    return { ...info, data: new Uint8Array(gz), diffId: sha256(raw) };
  });
  const configJson = JSON.stringify({
    created: "2024-01-01T00:00:00Z",
    architecture,
    os: "linux",
    config: { Env: ["PATH=/usr/bin:/bin"], Cmd: ["/bin/sh"], Labels: { "org.example.fixture": "yes" } },
    rootfs: { type: "layers", diff_ids: layers.map((l) => l.diffId) },
    history: layers.map((_, i) => ({ created: "2024-01-01T00:00:00Z", created_by: `layer ${i}` })),
  });
  const config = writeBlob(layout, configJson, "application/vnd.oci.image.config.v1+json");
  const manifestJson = JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: config.mediaType, digest: config.digest, size: config.size },
    layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
  });
  const manifest = writeBlob(layout, manifestJson, "application/vnd.oci.image.manifest.v1+json");
  return {
    manifest,
    manifestBytes: new TextEncoder().encode(manifestJson),
    config,
    configBytes: new TextEncoder().encode(configJson),
    layers,
    architecture,
  };
}

function writeLayout(layout: string, manifests: object[]): void {
  writeFileSync(join(layout, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(join(layout, "index.json"), JSON.stringify({ schemaVersion: 2, manifests }));
}

/** Makes `layout` an OCI layout whose only image, tagged `latest`, is the OCI manifest `digest`. */
export function tagLatest(layout: string, digest: string, size: number): void {
  writeLayout(layout, [{
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    digest,
    size,
    annotations: { "org.opencontainers.image.ref.name": "latest" },
  }]);
}

/** The ordinary files of the base fixture image. */
export const BASE_LAYERS: TarEntry[][] = [
  [
    { name: "etc/", type: "dir" },
    { name: "etc/os-release", content: 'NAME="Fixture Linux"\nVERSION_ID=1\n' },
    { name: "bin/", type: "dir" },
    { name: "bin/hello", content: "#!/bin/sh\necho hello\n", mode: 0o755 },
    { name: "usr/", type: "dir" },
    { name: "usr/share/", type: "dir" },
    { name: "usr/share/data.bin", content: noise(300_000, 7) },
  ],
  [
    { name: "etc/", type: "dir" },
    { name: "etc/motd", content: "welcome\n" },
    { name: "bin/sh", type: "symlink", linkname: "hello" },
    { name: "usr/", type: "dir" },
    { name: "usr/share/", type: "dir" },
    { name: "usr/share/big.bin", content: noise(2_500_000, 11) },
  ],
];

/** Everything the integration tests open. */
export interface Fixtures {
  root: string;
  /** `oci:` layout with the base image tagged `latest`. */
  layout: string;
  image: BuiltImage;
  /** `oci:` layout whose `latest` is a two-platform index (amd64, arm64). */
  multiLayout: string;
  multi: { index: BlobInfo; amd64: BuiltImage; arm64: BuiltImage };
  /** `oci:` layout where one byte of the second layer blob was changed on disk. */
  tamperedLayout: string;
  /** The base image as an `oci-archive:` tarball. */
  ociArchive: string;
  /** The base image as a `docker-archive:` tarball. */
  dockerArchive: string;
  /** The base image as a `dir:` folder. */
  dir: string;
}

/** The system skopeo used to convert fixtures (any version works for `copy`). */
const CONVERTER = "skopeo";

/** Builds the fixtures once into a per-runtime folder and returns where they are. */
export function buildFixtures(): Fixtures {
  const root = join(tmpdir(), `cip-fixtures-${RUNTIME}-v2`);
  const stamp = join(root, "ready.json");
  if (existsSync(stamp)) return JSON.parse(readFileSync(stamp, "utf8"), reviveBytes);
  const building = `${root}.build-${process.pid}`;
  rmSync(building, { recursive: true, force: true });
  mkdirSync(building, { recursive: true });

  const layout = join(building, "layout");
  const image = writeImage(layout, BASE_LAYERS);
  writeLayout(layout, [{
    mediaType: image.manifest.mediaType,
    digest: image.manifest.digest,
    size: image.manifest.size,
    annotations: { "org.opencontainers.image.ref.name": "latest" },
  }]);

  const multiLayout = join(building, "multi");
  const amd64 = writeImage(multiLayout, [[{ name: "arch", content: "amd64\n" }]], "amd64");
  const arm64 = writeImage(multiLayout, [[{ name: "arch", content: "arm64\n" }]], "arm64");
  const indexJson = JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [amd64, arm64].map((img) => ({
      mediaType: img.manifest.mediaType,
      digest: img.manifest.digest,
      size: img.manifest.size,
      platform: { architecture: img.architecture, os: "linux" },
    })),
  });
  const index = writeBlob(multiLayout, indexJson, "application/vnd.oci.image.index.v1+json");
  writeLayout(multiLayout, [{
    mediaType: index.mediaType,
    digest: index.digest,
    size: index.size,
    annotations: { "org.opencontainers.image.ref.name": "latest" },
  }]);

  const tamperedLayout = join(building, "tampered");
  const tampered = writeImage(tamperedLayout, BASE_LAYERS);
  writeLayout(tamperedLayout, [{
    mediaType: tampered.manifest.mediaType,
    digest: tampered.manifest.digest,
    size: tampered.manifest.size,
    annotations: { "org.opencontainers.image.ref.name": "latest" },
  }]);
  const victim = join(tamperedLayout, "blobs", "sha256", tampered.layers[1].digest.slice(7));
  const bytes = readFileSync(victim);
  bytes[bytes.length >> 1] ^= 0xff;
  writeFileSync(victim, bytes);

  const ociArchive = join(building, "image.oci.tar");
  const dockerArchive = join(building, "image.docker.tar");
  const dir = join(building, "dir");
  const copy = (dest: string) =>
    execFileSync(CONVERTER, ["--insecure-policy", "copy", "-q", `oci:${layout}:latest`, dest], {
      stdio: ["ignore", "ignore", "pipe"],
    });
  copy(`oci-archive:${ociArchive}:latest`);
  copy(`docker-archive:${dockerArchive}:fixture/base:latest`);
  copy(`dir:${dir}`);

  const fixtures: Fixtures = {
    root,
    layout: join(root, "layout"),
    image,
    multiLayout: join(root, "multi"),
    multi: { index, amd64, arm64 },
    tamperedLayout: join(root, "tampered"),
    ociArchive: join(root, "image.oci.tar"),
    dockerArchive: join(root, "image.docker.tar"),
    dir: join(root, "dir"),
  };
  writeFileSync(join(building, "ready.json"), JSON.stringify(fixtures, replaceBytes));
  rmSync(root, { recursive: true, force: true });
  try {
    renameSync(building, root);
  } catch {
    // Another test file built it at the same time: use theirs.
    rmSync(building, { recursive: true, force: true });
  }
  return JSON.parse(readFileSync(stamp, "utf8"), reviveBytes);
}

function replaceBytes(_key: string, value: unknown): unknown {
  if (value instanceof Uint8Array) return { $bytes: Buffer.from(value).toString("base64") };
  return value;
}

function reviveBytes(_key: string, value: unknown): unknown {
  if (value && typeof value === "object" && "$bytes" in value) {
    return new Uint8Array(Buffer.from((value as { $bytes: string }).$bytes, "base64"));
  }
  return value;
}
