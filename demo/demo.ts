/**
 * `deno task demo`: builds a small two-layer image as an OCI layout (deterministic, no network), then
 * runs the `image-proxy` command line on it with the default skopeo: `metadata`, `fetch --output` and
 * `extract`, showing what a user would see. Pass `--keep` to keep the folder it works in.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { lstat, readlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import process from "node:process";
import { gzipSync } from "node:zlib";
import { type CliIo, processIo, run } from "../src/cli/main.ts";
import { tar, type TarEntry } from "../tests/helpers/fixtures.ts";

const say = (text = "") => process.stdout.write(`${text}\n`);

/** Writes an OCI layout with one image made of `layers`, tagged `tag`. */
function buildImage(dir: string, tag: string, layers: TarEntry[][]): void {
  const blobs = join(dir, "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  const put = (data: Uint8Array | string, mediaType: string) => {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    const digest = `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
    writeFileSync(join(blobs, digest.slice(7)), bytes);
    return { mediaType, digest, size: bytes.length };
  };
  const tars = layers.map((entries) => tar(entries));
  const layerDescriptors = tars.map((t) =>
    put(gzipSync(t, { level: 9 }), "application/vnd.oci.image.layer.v1.tar+gzip")
  );
  const config = put(
    JSON.stringify({
      created: "2024-06-01T00:00:00Z",
      architecture: "amd64",
      os: "linux",
      config: { Entrypoint: ["/usr/bin/hello"], Env: ["PATH=/usr/bin:/bin"], WorkingDir: "/" },
      rootfs: {
        type: "layers",
        diff_ids: tars.map((t) => `sha256:${createHash("sha256").update(t).digest("hex")}`),
      },
      history: [
        { created: "2024-06-01T00:00:00Z", created_by: "ADD base /" },
        { created: "2024-06-01T00:00:00Z", created_by: "COPY hello /usr/bin/" },
      ],
    }),
    "application/vnd.oci.image.config.v1+json",
  );
  const manifest = put(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config,
      layers: layerDescriptors,
    }),
    "application/vnd.oci.image.manifest.v1+json",
  );
  writeFileSync(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    join(dir, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ ...manifest, annotations: { "org.opencontainers.image.ref.name": tag } }],
    }),
  );
}

/** Runs `image-proxy ARGS...` in this process, as a user would from a shell; returns its stdout. */
async function cli(args: string[], io: CliIo): Promise<string> {
  say(`$ image-proxy ${args.join(" ")}`);
  let stdout = "";
  const status = await run({
    ...io,
    args,
    writeStdout: (data) => {
      stdout += typeof data === "string" ? data : new TextDecoder().decode(data);
      return Promise.resolve();
    },
  });
  if (status !== 0) {
    say(`(exit status ${status})`);
    process.exit(status);
  }
  return stdout;
}

/** Prints the first `lines` lines of `text`, then how many were left out. */
function brief(text: string, lines: number): void {
  const all = text.trimEnd().split("\n");
  for (const line of all.slice(0, lines)) say(line);
  if (all.length > lines) say(`  ... (${all.length - lines} more lines)`);
  say();
}

async function tree(root: string, dir = root): Promise<string[]> {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    const info = await lstat(path);
    const mode = (info.mode & 0o7777).toString(8).padStart(4, "0");
    if (info.isDirectory()) {
      out.push(`${mode}  ${relative(root, path)}/`);
      out.push(...await tree(root, path));
    } else if (info.isSymbolicLink()) {
      out.push(`${mode}  ${relative(root, path)} -> ${await readlink(path)}`);
    } else {
      out.push(
        `${mode}  ${relative(root, path)}  (${info.size} bytes${
          info.nlink > 1 ? `, ${info.nlink} links` : ""
        })`,
      );
    }
  }
  return out;
}

const work = mkdtempSync(join(tmpdir(), "image-proxy-demo-"));
const keep = process.argv.includes("--keep") ||
  (globalThis as { Deno?: { args: string[] } }).Deno?.args.includes("--keep");
try {
  const layout = join(work, "image");
  buildImage(layout, "1.0", [
    [
      { name: "etc/", type: "dir" },
      { name: "etc/os-release", content: 'NAME="Demo Linux"\nID=demo\nVERSION_ID=1.0\n' },
      { name: "usr/", type: "dir" },
      { name: "usr/bin/", type: "dir" },
      { name: "usr/share/", type: "dir" },
      { name: "usr/share/doc/", type: "dir" },
      { name: "usr/share/doc/README", content: "Built by demo/demo.ts.\n" },
      { name: "usr/share/doc/CHANGES", content: "1.0: first release\n" },
      { name: "bin", type: "symlink", linkname: "usr/bin" },
      { name: "tmp/", type: "dir", mode: 0o1777 },
    ],
    [
      { name: "usr/bin/hello", content: '#!/bin/sh\necho "hello from a container image"\n', mode: 0o755 },
      { name: "usr/bin/hi", type: "link", linkname: "usr/bin/hello" },
      { name: "usr/share/doc/.wh.CHANGES", content: "" },
      { name: "etc/motd", content: "Unpacked by image-proxy extract.\n" },
    ],
  ]);
  const ref = `oci:${layout}:1.0`;
  say(`A two-layer image, built here as an OCI layout: ${ref}\n`);
  const io = processIo();

  brief(await cli(["metadata", ref], io), 14);

  const copy = join(work, "copy");
  const fetched = JSON.parse(await cli(["fetch", ref, "--output", copy], io));
  say(
    `wrote ${fetched.layout}: manifest ${fetched.digest.slice(0, 19)}..., ${fetched.layers.length} layers, ` +
      `${fetched.bytesFetched} bytes fetched and verified\n`,
  );

  const rootfs = join(work, "rootfs");
  const extracted = JSON.parse(await cli(["extract", `oci:${copy}:1.0`, rootfs], io));
  say(
    `${extracted.files} files, ${extracted.directories} directories, ${extracted.symlinks} symlink, ` +
      `${extracted.hardlinks} hardlink, ${extracted.whiteouts} whiteout applied:`,
  );
  for (const line of await tree(rootfs)) say(`  ${line}`);
  say(`\n$ cat ${join(rootfs, "etc/motd")}`);
  process.stdout.write(readFileSync(join(rootfs, "etc/motd"), "utf8"));
} finally {
  if (keep) say(`\n(kept ${work})`);
  else rmSync(work, { recursive: true, force: true });
}
