/**
 * The inspect benchmark: `ls`, `export` and `cat` against what they must not be much slower than, and
 * what the blob cache saves, on every skopeo server the tests use, under Deno and Bun, printed as one
 * Markdown table.
 *
 *   deno run --allow-read --allow-write --allow-run --allow-env --allow-ffi bench/inspect.ts [options]
 *   bun bench/inspect.ts [options]
 *
 * Options: `--runs N` (default 3), `--runtime deno|bun` (default both), `--server NAME` (substring,
 * repeatable), `--only METRIC` (substring, repeatable).
 *
 * Rows (see bench/README.md):
 * - `ls` of the stacked Debian image (tests/helpers/stacked.ts: base-files, tzdata and two more layers,
 *   about 2,000 paths): the library's `listImage` with every line formatted as `ls` prints it, from
 *   OpenImage to the last entry, against GNU `tar -tf` run over the same four layer files.
 * - `export` of a 4 x 256 MiB image (gzip'd tars of random files) to nowhere against fetching the same
 *   layers with `getBlob` and decompressing them, nothing else: throughput of the uncompressed bytes.
 * - `cat` of a small file in the top layer of that image: the blob bytes fetched, against the top
 *   layer's size.
 * - a second `extract` and `export` of the stacked image with a warm cache: the GetBlob requests that
 *   reached skopeo, against those of the first (cold) one.
 *
 * Each measurement of ours runs in a fresh process of the runtime (this file with `--client TASK`);
 * runs of ours and of the baseline alternate, and the table shows medians.
 *
 * @module
 */

import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { type Server, SERVERS } from "../tests/helpers/env.ts";

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(BENCH, "..");
const MiB = 1 << 20;
const GiB = 1 << 30;
const DENO_PERMISSIONS = ["--allow-read", "--allow-write", "--allow-run", "--allow-env", "--allow-ffi"];
const RUN_TIMEOUT_MS = 300_000;

type Runtime = "deno" | "bun";

/** What a client process is asked to measure. */
interface ClientTask {
  mode: "ls" | "export" | "decompress" | "cat" | "cache";
  skopeoCmd: string[];
  ref: string;
  path?: string;
}

function log(text: string): void {
  process.stderr.write(text + "\n");
}

// ---------------------------------------------------------------------------------------------------
// The client side: one measurement in this process, printed as one JSON line.

async function client(task: ClientTask): Promise<Record<string, number>> {
  const { ImageProxy } = await import("../mod.ts");
  const { BlobCache, exportImage, listImage, readFile, useBlobCache } = await import(
    "../src/image/inspect.ts"
  );
  const { extractImage } = await import("../src/image/extract.ts");
  const { decompress } = await import("../src/image/decompress.ts");
  const { longListing } = await import("../src/cli/inspect.ts");
  const drain = async (stream: ReadableStream<Uint8Array>) => {
    let bytes = 0;
    for await (const chunk of stream) bytes += chunk.length;
    return bytes;
  };
  await using proxy = await ImageProxy.spawn({ skopeoCmd: task.skopeoCmd });
  // Counted under the cache: the calls that become GetBlob requests, and the bytes they bring.
  const counts = { requests: 0, fetched: 0 };
  const getBlob = proxy.getBlob.bind(proxy);
  proxy.getBlob = async (image, digest, size, options) => {
    counts.requests++;
    const blob = await getBlob(image, digest, size, options);
    const counter = new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        counts.fetched += chunk.length;
        controller.enqueue(chunk);
      },
    });
    return { size: blob.size, stream: blob.stream.pipeThrough(counter) };
  };
  const start = performance.now();
  const seconds = () => (performance.now() - start) / 1e3;
  switch (task.mode) {
    case "ls": {
      const image = await proxy.openImage(task.ref);
      let entries = 0;
      let text = 0;
      for await (const entry of listImage(proxy, image)) {
        text += longListing(entry).length + 1;
        entries++;
      }
      return { seconds: seconds(), entries, text };
    }
    case "export": {
      const image = await proxy.openImage(task.ref);
      const bytes = await drain(exportImage(proxy, image));
      return { seconds: seconds(), bytes, fetched: counts.fetched };
    }
    case "decompress": {
      const image = await proxy.openImage(task.ref);
      const { manifest } = await proxy.fetchManifest(image);
      let bytes = 0;
      // Top first, one at a time, as export reads them.
      for (const layer of [...manifest.layers].reverse()) {
        const blob = await proxy.getDescriptor(image, layer);
        bytes += await drain((await decompress(blob.stream)).stream);
      }
      return { seconds: seconds(), bytes, fetched: counts.fetched };
    }
    case "cat": {
      const image = await proxy.openImage(task.ref);
      const bytes = await drain(await readFile(proxy, image, task.path!));
      return { seconds: seconds(), bytes, fetched: counts.fetched };
    }
    case "cache": {
      const dir = mkdtempSync(join(tmpdir(), "cip-bench-cache-"));
      try {
        useBlobCache(proxy, new BlobCache(join(dir, "cache")));
        const image = await proxy.openImage(task.ref);
        const pass = async (name: string) => {
          const before = counts.requests;
          const t = performance.now();
          await extractImage(proxy, image, join(dir, name));
          await drain(exportImage(proxy, image));
          return { requests: counts.requests - before, seconds: (performance.now() - t) / 1e3 };
        };
        const cold = await pass("cold");
        const warm = await pass("warm");
        return {
          coldRequests: cold.requests,
          warmRequests: warm.requests,
          coldSeconds: cold.seconds,
          warmSeconds: warm.seconds,
        };
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Fixtures, cached under the temp dir.

interface ExportFixture {
  ref: string;
  /** Each layer's blob size and uncompressed size, bottom first. */
  layers: { size: number; uncompressed: number }[];
}

function sh(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
}

function sha256File(path: string): string {
  return `sha256:${sh("sha256sum", [path]).split(" ")[0]}`;
}

/**
 * An OCI layout with one image of four gzip'd tar layers of 256 MiB each (16 random files of 16 MiB),
 * the top one also holding `etc/hello`.
 */
function exportFixture(work: string): ExportFixture {
  const root = join(work, "inspect-4x256");
  const stamp = join(root, "fixture.json");
  if (existsSync(stamp)) return JSON.parse(readFileSync(stamp, "utf8"));
  log(`building a 4 x 256 MiB image of gzip'd tar layers in ${root}`);
  const building = `${root}.build-${process.pid}`;
  rmSync(building, { recursive: true, force: true });
  const blobs = join(building, "layout", "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  const put = (path: string) => {
    const digest = sha256File(path);
    const size = Number(sh("stat", ["-c", "%s", path]).trim());
    renameSync(path, join(blobs, digest.slice(7)));
    return { digest, size };
  };
  const putJson = (value: unknown) => {
    const bytes = new TextEncoder().encode(JSON.stringify(value));
    const digest = `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
    writeFileSync(join(blobs, digest.slice(7)), bytes);
    return { digest, size: bytes.length };
  };
  const layers = [0, 1, 2, 3].map((i) => {
    const dir = join(building, `l${i}`);
    mkdirSync(join(dir, "etc"), { recursive: true });
    mkdirSync(join(dir, `data${i}`));
    sh("sh", [
      "-c",
      'for n in $(seq 1 16); do head -c 16M /dev/urandom > "$1/f$n"; done',
      "sh",
      join(dir, `data${i}`),
    ]);
    if (i === 3) writeFileSync(join(dir, "etc", "hello"), "hello from the top layer\n");
    const tarFile = join(building, `l${i}.tar`);
    sh("tar", ["-C", dir, "--sort=name", "--numeric-owner", "--owner=0", "--group=0", "-cf", tarFile, "."]);
    rmSync(dir, { recursive: true });
    const diffId = sha256File(tarFile);
    const uncompressed = Number(sh("stat", ["-c", "%s", tarFile]).trim());
    sh("gzip", ["-1", "-n", tarFile]);
    return { ...put(`${tarFile}.gz`), diffId, uncompressed };
  });
  const config = putJson({
    architecture: "amd64",
    os: "linux",
    config: {},
    rootfs: { type: "layers", diff_ids: layers.map((l) => l.diffId) },
  });
  const manifest = putJson({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
    layers: layers.map((l) => ({
      mediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
      digest: l.digest,
      size: l.size,
    })),
  });
  const layout = join(building, "layout");
  writeFileSync(join(layout, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    join(layout, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        ...manifest,
        annotations: { "org.opencontainers.image.ref.name": "four" },
      }],
    }),
  );
  const fixture: ExportFixture = {
    ref: `oci:${join(root, "layout")}:four`,
    layers: layers.map((l) => ({ size: l.size, uncompressed: l.uncompressed })),
  };
  writeFileSync(join(building, "fixture.json"), JSON.stringify(fixture));
  rmSync(root, { recursive: true, force: true });
  renameSync(building, root);
  return fixture;
}

/** The stacked Debian image and its four layer blob files. */
async function stackedFixture(): Promise<{ ref: string; blobFiles: string[] }> {
  const { stackedImage } = await import("../tests/helpers/stacked.ts");
  const stacked = stackedImage();
  if ("skip" in stacked) throw new Error(`Cannot build the stacked Debian image: ${stacked.skip}`);
  const blobs = join(stacked.layout, "blobs", "sha256");
  const manifest = JSON.parse(readFileSync(join(blobs, stacked.manifestDigest.slice(7)), "utf8"));
  return {
    ref: stacked.ref,
    blobFiles: manifest.layers.map((l: { digest: string }) => join(blobs, l.digest.slice(7))),
  };
}

// ---------------------------------------------------------------------------------------------------
// Running and the table.

function runtimeCommand(runtime: Runtime): string[] {
  const current = "Bun" in globalThis ? "bun" : "deno";
  const binary = runtime === current
    ? process.execPath
    : [join(ROOT, ".tools", "bin", runtime)].find(existsSync) ?? runtime;
  return runtime === "deno" ? [binary, "run", ...DENO_PERMISSIONS] : [binary];
}

function ours(runtime: Runtime, task: ClientTask): Record<string, number> {
  const argv = [...runtimeCommand(runtime), fileURLToPath(import.meta.url), "--client", JSON.stringify(task)];
  const child = spawnSync(argv[0], argv.slice(1), {
    cwd: ROOT,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    timeout: RUN_TIMEOUT_MS,
    killSignal: "SIGKILL",
  });
  const line = (child.stdout ?? "").trim().split("\n").pop() ?? "";
  if (child.status !== 0 || !line.startsWith("{")) {
    throw new Error(`${runtime} ${task.mode} failed (status ${child.status}): ${child.stderr?.trim()}`);
  }
  return JSON.parse(line);
}

/** Wall seconds of a command, its output discarded. */
function timed(argv: string[]): number {
  const start = performance.now();
  const child = spawnSync(argv[0], argv.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
  if (child.status !== 0) throw new Error(`${argv.join(" ")} failed: ${child.stderr}`);
  return (performance.now() - start) / 1e3;
}

interface Row {
  metric: string;
  server: string;
  runtime: Runtime;
  unit: "ms" | "GiB/s" | "MiB" | "requests";
  ours: number[];
  base: number[];
  target?: { text: string; pass: (ours: number, base: number) => boolean };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length === 0 ? NaN : sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function fmt(unit: Row["unit"], value: number): string {
  if (Number.isNaN(value)) return "—";
  const digits = unit === "GiB/s" ? 2 : unit === "requests" ? 0 : unit === "MiB" ? 3 : 1;
  return `${value.toFixed(digits)} ${unit}`;
}

function table(rows: Row[], runs: number): string {
  const lines = [
    `| metric | server | runtime | ours | baseline | ratio | target | result | spread ours / baseline (n=${runs}) |`,
    "|---|---|---|---|---|---|---|---|---|",
  ];
  for (const row of rows) {
    const o = median(row.ours);
    const b = median(row.base);
    const ratio = b === 0 || Number.isNaN(o / b) ? "—" : `${(o / b).toFixed(2)}x`;
    const result = row.target ? (row.target.pass(o, b) ? "pass" : "FAIL") : "info";
    const spread = (values: number[]) =>
      values.length < 2 ? "" : `${fmt(row.unit, Math.min(...values))}–${fmt(row.unit, Math.max(...values))}`;
    lines.push(
      `| ${row.metric} | ${row.server} | ${row.runtime} | ${fmt(row.unit, o)} | ${
        fmt(row.unit, b)
      } | ${ratio} | ${row.target?.text ?? "—"} | ${result} | ${spread(row.ours)} / ${spread(row.base)} |`,
    );
  }
  return lines.join("\n");
}

async function main(argv: string[]): Promise<void> {
  let runs = 3;
  let runtimes: Runtime[] = ["deno", "bun"];
  const servers: string[] = [];
  const only: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => inline ?? argv[++i] ?? "";
    if (flag === "--runs") runs = Number(value());
    else if (flag === "--runtime") runtimes = [value() as Runtime];
    else if (flag === "--server") servers.push(value());
    else if (flag === "--only") only.push(value().toLowerCase());
    else {
      process.stderr.write(
        "usage: bench/inspect.ts [--runs N] [--runtime deno|bun] [--server NAME]... [--only METRIC]...\n",
      );
      process.exit(2);
    }
  }
  if (!Number.isInteger(runs) || runs < 1 || runtimes.some((r) => r !== "deno" && r !== "bun")) {
    process.stderr.write("error: --runs takes a positive integer, --runtime deno or bun\n");
    process.exit(2);
  }
  const work = join(process.env.BENCH_TMPDIR ?? tmpdir(), "cip-bench");
  mkdirSync(work, { recursive: true });
  const big = exportFixture(work);
  const stacked = await stackedFixture();
  // Read from memory like every later run.
  sh("sh", ["-c", 'cat "$1"/blobs/sha256/* > /dev/null', "sh", big.ref.slice(4, big.ref.lastIndexOf(":"))]);
  const uncompressed = big.layers.reduce((n, l) => n + l.uncompressed, 0);
  const topLayer = big.layers[3].size;
  const rows: Row[] = [];
  const wanted = (metric: string) => only.length === 0 || only.some((o) => metric.toLowerCase().includes(o));
  const chosen = SERVERS.filter((s) => servers.length === 0 || servers.some((name) => s.name.includes(name)));

  const pairs = (
    metric: string,
    server: Server,
    runtime: Runtime,
    unit: Row["unit"],
    measure: { ours: () => number; base: () => number },
    target?: Row["target"],
  ) => {
    if (!wanted(metric)) return;
    const row: Row = { metric, server: server.name, runtime, unit, ours: [], base: [], target };
    for (let i = 0; i < runs; i++) {
      row.ours.push(measure.ours());
      row.base.push(measure.base());
      log(
        `  ${metric} [${server.name}, ${runtime}] run ${i + 1}: ours ${fmt(unit, row.ours.at(-1)!)}, ` +
          `baseline ${fmt(unit, row.base.at(-1)!)}`,
      );
    }
    rows.push(row);
  };

  const started = performance.now();
  for (const server of chosen) {
    for (const runtime of runtimes) {
      const task = (mode: ClientTask["mode"], ref: string, path?: string) =>
        ours(runtime, { mode, skopeoCmd: server.skopeoCmd, ref, path });
      let entries = 0;
      pairs(
        "ls, stacked Debian image (4 layers): listImage vs GNU tar -tf over the layer files",
        server,
        runtime,
        "ms",
        {
          ours: () => {
            const r = task("ls", stacked.ref);
            entries = r.entries;
            return r.seconds * 1e3;
          },
          base: () => timed(["sh", "-c", 'for f; do tar -tf "$f"; done', "sh", ...stacked.blobFiles]) * 1e3,
        },
        { text: "<= 1.5x", pass: (o, b) => o <= 1.5 * b },
      );
      if (entries > 0) rows.at(-1)!.metric += ` (${entries} paths)`;
      pairs(
        `export 4 x 256 MiB (uncompressed bytes/s) vs getBlob + decompress alone`,
        server,
        runtime,
        "GiB/s",
        {
          ours: () => uncompressed / GiB / task("export", big.ref).seconds,
          base: () => uncompressed / GiB / task("decompress", big.ref).seconds,
        },
        { text: ">= 0.8x", pass: (o, b) => o >= 0.8 * b },
      );
      pairs(
        "cat etc/hello from the top of 4 x 256 MiB: bytes fetched vs top layer size",
        server,
        runtime,
        "MiB",
        {
          ours: () => task("cat", big.ref, "etc/hello").fetched / MiB,
          base: () => topLayer / MiB,
        },
        { text: "= 1.00x", pass: (o, b) => o === b },
      );
      let cold = 0;
      pairs(
        "GetBlob requests, second extract + export with a warm cache vs the first",
        server,
        runtime,
        "requests",
        {
          ours: () => {
            const r = task("cache", stacked.ref);
            cold = r.coldRequests;
            return r.warmRequests;
          },
          base: () => cold,
        },
        { text: "ours = 0", pass: (o) => o === 0 },
      );
    }
  }
  process.stdout.write(table(rows, runs) + "\n");
  log(`(${((performance.now() - started) / 1e3).toFixed(0)} s; medians of ${runs} run(s))`);
}

if (import.meta.main) {
  const at = process.argv.indexOf("--client");
  if (at >= 0) {
    const result = await client(JSON.parse(process.argv[at + 1]));
    process.stdout.write(JSON.stringify(result) + "\n");
  } else {
    await main(process.argv.slice(2));
  }
}
