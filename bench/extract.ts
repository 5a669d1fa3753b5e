/**
 * `extract` of a real Debian root file system against GNU tar and umoci (issue 14): the same gzip'd
 * layer, unpacked by our client (`extractImage` through skopeo, in a fresh process of Deno or Bun,
 * bench/extract-child.ts), by `tar -xzpf` of the layer blob, and by `umoci unpack` of the same image.
 * Runs alternate side by side; the table shows medians.
 *
 *   deno run --allow-read --allow-write --allow-run --allow-env --allow-ffi bench/extract.ts [options]
 *   bun bench/extract.ts [options]
 *
 * Options: `--runs N` (default 5), `--runtime deno|bun` (default both), `--server NAME` (substring of
 * the skopeo server's name; default the newest), `--fs disk|tmpfs` (where to extract; default both,
 * tmpfs being /dev/shm), `--lib DIR` (measure a scratch copy of the library), `--out FILE`,
 * `--json FILE` (every run's raw result).
 *
 * The image is built once with `mmdebstrap --variant=minbase bookworm` (from the configured Debian
 * mirror, as root) into `$BENCH_TMPDIR` or the temp folder (`cip-bench/`), layered with GNU tar (PAX,
 * xattrs, numeric owners, `gzip -n`), and reused after that. See bench/README.md.
 *
 * @module
 */

import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { NEW_SERVER, type Server, SERVERS } from "../tests/helpers/env.ts";
import type { ExtractTask } from "./extract-child.ts";

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(BENCH, "..");
const MiB = 1024;
const DENO_PERMISSIONS = ["--allow-read", "--allow-write", "--allow-run", "--allow-env", "--allow-ffi"];
/** A run that takes longer than this is killed (its skopeo dies with it through setpriv). */
const RUN_TIMEOUT_MS = 300_000;
/** How the root file system is made: its hash names the cached image. */
const RECIPE = [
  "mmdebstrap --variant=minbase --quiet bookworm root",
  "tar --create --file=layer.tar --directory=root --format=pax --xattrs '--xattrs-include=*' --numeric-owner --sort=name .",
  "gzip -6 -n layer.tar",
];

type Runtime = "deno" | "bun";
type FileSystem = "disk" | "tmpfs";

interface Options {
  runs: number;
  runtimes: Runtime[];
  servers: string[];
  fileSystems: FileSystem[];
  lib?: string;
  out?: string;
  json?: string;
}

function parseOptions(argv: string[]): Options {
  const options: Options = {
    runs: 5,
    runtimes: ["deno", "bun"],
    servers: [],
    fileSystems: ["disk", "tmpfs"],
  };
  const runtimes: Runtime[] = [];
  const fileSystems: FileSystem[] = [];
  for (let i = 0; i < argv.length; i++) {
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`Option "${argv[i]}" needs a value`);
      return argv[++i];
    };
    const arg = argv[i];
    if (arg === "--runs") options.runs = Math.max(1, Number(value()) | 0);
    else if (arg === "--runtime") {
      const runtime = value();
      if (runtime !== "deno" && runtime !== "bun") throw new Error(`Unknown runtime "${runtime}"`);
      runtimes.push(runtime);
    } else if (arg === "--server") options.servers.push(value());
    else if (arg === "--fs") {
      const fs = value();
      if (fs !== "disk" && fs !== "tmpfs") throw new Error(`Unknown file system "${fs}": disk or tmpfs`);
      fileSystems.push(fs);
    } else if (arg === "--lib") options.lib = resolve(value());
    else if (arg === "--out") options.out = value();
    else if (arg === "--json") options.json = value();
    else throw new Error(`Unknown option "${arg}"`);
  }
  if (runtimes.length > 0) options.runtimes = runtimes;
  if (fileSystems.length > 0) options.fileSystems = fileSystems;
  return options;
}

function log(message: string): void {
  process.stderr.write(`[bench/extract] ${message}\n`);
}

function sh(command: string, args: string[], cwd?: string): string {
  return execFileSync(command, args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
}

function sha256File(path: string): string {
  return "sha256:" + sh("sha256sum", [path]).split(" ")[0];
}

/** The cached image: an OCI layout with one gzip'd layer of a minbase bookworm. */
interface Fixture {
  layout: string;
  ref: string;
  /** The layer blob (a gzip'd tar), what `tar -xzpf` reads. */
  blob: string;
  blobBytes: number;
  tarBytes: number;
  entries: number;
}

function buildFixture(): Fixture {
  const base = process.env.BENCH_TMPDIR ?? join(tmpdir(), "cip-bench");
  const hash = createHash("sha256").update(RECIPE.join("\n")).digest("hex").slice(0, 16);
  const root = join(base, `extract-rootfs-${hash}`);
  const stamp = join(root, "fixture.json");
  if (existsSync(stamp)) return JSON.parse(readFileSync(stamp, "utf8"));
  for (const tool of ["mmdebstrap", "tar", "gzip", "sha256sum"]) {
    if (spawnSync("sh", ["-c", `command -v ${tool}`]).status !== 0) {
      throw new Error(`${tool} is not installed: apt-get install mmdebstrap (as root)`);
    }
  }
  const building = `${root}.build-${process.pid}`;
  rmSync(building, { recursive: true, force: true });
  mkdirSync(building, { recursive: true });
  log(`building a minbase bookworm root file system in ${building} (mmdebstrap, about a minute)`);
  for (const line of RECIPE) sh("sh", ["-c", line], building);
  const entries = Number(sh("sh", ["-c", "find root | wc -l"], building).trim());
  rmSync(join(building, "root"), { recursive: true, force: true });

  const gz = join(building, "layer.tar.gz");
  const diffId = "sha256:" + sh("sh", ["-c", "gzip -dc layer.tar.gz | sha256sum"], building).split(" ")[0];
  const tarBytes = Number(sh("sh", ["-c", "gzip -dc layer.tar.gz | wc -c"], building).trim());
  const layout = join(building, "layout");
  const blobs = join(layout, "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  const layerDigest = sha256File(gz);
  const blobBytes = statSync(gz).size;
  renameSync(gz, join(blobs, layerDigest.slice(7)));
  const put = (text: string) => {
    const digest = "sha256:" + createHash("sha256").update(text).digest("hex");
    writeFileSync(join(blobs, digest.slice(7)), text);
    return { digest, size: new TextEncoder().encode(text).length };
  };
  const config = put(JSON.stringify({
    architecture: "amd64",
    os: "linux",
    config: { Cmd: ["/bin/bash"] },
    rootfs: { type: "layers", diff_ids: [diffId] },
  }));
  const manifest = put(JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
    layers: [{
      mediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
      digest: layerDigest,
      size: blobBytes,
    }],
  }));
  writeFileSync(join(layout, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    join(layout, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        ...manifest,
        annotations: { "org.opencontainers.image.ref.name": "latest" },
      }],
    }),
  );
  const fixture: Fixture = {
    layout: join(root, "layout"),
    ref: `oci:${join(root, "layout")}:latest`,
    blob: join(root, "layout", "blobs", "sha256", layerDigest.slice(7)),
    blobBytes,
    tarBytes,
    entries,
  };
  writeFileSync(join(building, "fixture.json"), JSON.stringify(fixture));
  rmSync(root, { recursive: true, force: true });
  renameSync(building, root);
  return fixture;
}

function compileMaxrss(): string {
  const source = join(BENCH, "maxrss.c");
  const hash = createHash("sha256").update(readFileSync(source)).digest("hex").slice(0, 16);
  const dir = process.env.BENCH_TMPDIR ?? join(tmpdir(), "cip-bench");
  mkdirSync(dir, { recursive: true });
  const binary = join(dir, `maxrss-${hash}`);
  if (!existsSync(binary)) {
    sh("cc", ["-O2", "-Wall", "-o", `${binary}.tmp`, source]);
    renameSync(`${binary}.tmp`, binary);
  }
  return binary;
}

/** One side's result for one run. */
interface Sample {
  side: string;
  fs: FileSystem;
  run: number;
  /** Wall time from fork to reaping, in seconds. */
  seconds: number;
  /** Peak RSS of the process and the children it reaped, MiB. */
  treeMiB: number;
  /** Ours only: peak RSS of the runtime's process minus its RSS after spawn and OpenImage, MiB. */
  aboveIdleMiB?: number;
}

/** Runs `command` through the maxrss wrapper: its wall time, peak RSS and stdout. */
function measure(maxrss: string, command: string[], env?: Record<string, string>): {
  seconds: number;
  treeMiB: number;
  stdout: string;
} {
  const result = spawnSync(maxrss, command, {
    cwd: ROOT,
    encoding: "utf8",
    timeout: RUN_TIMEOUT_MS,
    maxBuffer: 64 << 20,
    env: { ...process.env, ...env },
  });
  const lines = (result.stderr ?? "").trim().split("\n");
  let wrapper: { ms: number; maxrssKiB: number; status: number } | undefined;
  try {
    wrapper = JSON.parse(lines.at(-1) ?? "");
  } catch { /* reported below */ }
  if (!wrapper || wrapper.status !== 0) {
    throw new Error(
      `${command.join(" ")} failed: ${result.error ?? ""} ${(result.stderr ?? "").slice(-2000)}`,
    );
  }
  return { seconds: wrapper.ms / 1000, treeMiB: wrapper.maxrssKiB / MiB, stdout: result.stdout };
}

/**
 * Empties `out` (outside the timed part) and lets the file system finish its deferred work. Through
 * `rm`, since Deno guards /dev (where the tmpfs is) even from --allow-write.
 */
function reset(out: string): void {
  execFileSync("rm", ["-rf", "--", out]);
  execFileSync("sync");
}

function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function spread(values: number[], digits: number): string {
  return values.length < 2
    ? ""
    : `${Math.min(...values).toFixed(digits)}–${Math.max(...values).toFixed(digits)}`;
}

function main(): void {
  const options = parseOptions(process.argv.slice(2));
  const servers = options.servers.length > 0
    ? SERVERS.filter((s) => options.servers.some((n) => s.name.includes(n)))
    : [NEW_SERVER ?? SERVERS[0]].filter((s): s is Server => s !== undefined);
  if (servers.length === 0) throw new Error("No skopeo server found: run .ci/setup");
  const fixture = buildFixture();
  const maxrss = compileMaxrss();
  const umoci = spawnSync("sh", ["-c", "command -v umoci"]).status === 0;
  log(
    `image: ${fixture.entries} entries, ${(fixture.tarBytes / 2 ** 20).toFixed(0)} MiB of tar, ` +
      `${(fixture.blobBytes / 2 ** 20).toFixed(0)} MiB gzip'd; umoci ${umoci ? "found" : "not installed"}`,
  );

  const outs: Record<FileSystem, string> = {
    disk: join(process.env.BENCH_TMPDIR ?? join(tmpdir(), "cip-bench"), `extract-out-${process.pid}`),
    tmpfs: join("/dev/shm", `cip-bench-extract-out-${process.pid}`),
  };
  // Deno guards /dev (where the tmpfs is) even from --allow-write: only --allow-all opens it.
  const runtimeCommand = (runtime: Runtime, task: ExtractTask) =>
    runtime === "deno"
      ? [
        "deno",
        "run",
        ...(task.dir.startsWith("/dev/") ? ["--allow-all"] : DENO_PERMISSIONS),
        join(BENCH, "extract-child.ts"),
        JSON.stringify(task),
      ]
      : ["bun", join(BENCH, "extract-child.ts"), JSON.stringify(task)];
  const env: Record<string, string> = options.lib ? { BENCH_LIB: options.lib } : {};

  type Side = { name: string; run: (out: string) => Omit<Sample, "side" | "fs" | "run"> };
  const sides: Side[] = [];
  for (const server of servers) {
    for (const runtime of options.runtimes) {
      sides.push({
        name: `ours ${runtime} ${server.name}`,
        run: (out) => {
          const { seconds, treeMiB, stdout } = measure(
            maxrss,
            runtimeCommand(runtime, { skopeoCmd: server.skopeoCmd, ref: fixture.ref, dir: out }),
            env,
          );
          const child = JSON.parse(stdout.trim().split("\n").at(-1)!);
          if (child.entries < fixture.entries - 1) {
            throw new Error(`extract read ${child.entries} entries, the layer has ${fixture.entries}`);
          }
          return { seconds, treeMiB, aboveIdleMiB: (child.peakKiB - child.idleKiB) / MiB };
        },
      });
    }
  }
  sides.push({
    name: "tar -xzpf",
    run: (out) => {
      execFileSync("mkdir", ["--", out]);
      return measure(maxrss, ["tar", "-xzpf", fixture.blob, "-C", out]);
    },
  });
  if (umoci) {
    sides.push({
      name: "umoci unpack",
      run: (out) => measure(maxrss, ["umoci", "unpack", "--image", `${fixture.layout}:latest`, out]),
    });
  }

  const samples: Sample[] = [];
  for (const fs of options.fileSystems) {
    const out = outs[fs];
    log(`${fs}: warm-up (page cache, the runtimes' caches), then ${options.runs} alternated runs`);
    for (const side of sides) {
      reset(out);
      side.run(out);
    }
    for (let run = 1; run <= options.runs; run++) {
      for (const side of sides) {
        reset(out);
        const sample = { side: side.name, fs, run, ...side.run(out) };
        samples.push(sample);
        log(
          `${fs} run ${run} ${side.name}: ${sample.seconds.toFixed(2)} s, tree ${
            sample.treeMiB.toFixed(0)
          } MiB${
            sample.aboveIdleMiB === undefined ? "" : `, above idle ${sample.aboveIdleMiB.toFixed(1)} MiB`
          }`,
        );
      }
    }
    reset(out);
  }
  if (options.json) writeFileSync(options.json, samples.map((s) => JSON.stringify(s)).join("\n") + "\n");

  const of = (side: string, fs: FileSystem, key: "seconds" | "treeMiB" | "aboveIdleMiB") =>
    samples.filter((s) => s.side === side && s.fs === fs).map((s) => s[key]!);
  const lines = [
    `| metric | fs | runtime | ours | baseline | ratio | target | result | spread ours / baseline (n=${options.runs}) |`,
    "|---|---|---|---|---|---|---|---|---|",
  ];
  const row = (
    metric: string,
    fs: FileSystem,
    runtime: string,
    ours: number[],
    base: number[],
    unit: string,
    target?: { text: string; pass: (o: number, b: number) => boolean },
  ) => {
    const o = median(ours);
    const b = median(base);
    const digits = unit === "s" ? 2 : 1;
    const show = (v: number) => Number.isNaN(v) ? "—" : `${v.toFixed(digits)} ${unit}`;
    const ratio = Number.isNaN(b) || Number.isNaN(o) ? "—" : `${(o / b).toFixed(2)}x`;
    const result = target ? (target.pass(o, b) ? "pass" : "FAIL") : "info";
    lines.push(
      `| ${metric} | ${fs} | ${runtime} | ${show(o)} | ${show(b)} | ${ratio} | ${
        target?.text ?? "—"
      } | ${result} | ${spread(ours, digits)} / ${spread(base, digits)} |`,
    );
  };
  for (const fs of options.fileSystems) {
    for (const side of sides.filter((s) => s.name.startsWith("ours "))) {
      const runtime = side.name.split(" ")[1] +
        (servers.length > 1 ? `, ${side.name.split(" ").slice(2).join(" ")}` : "");
      row(
        "extract vs tar -xzpf (wall time)",
        fs,
        runtime,
        of(side.name, fs, "seconds"),
        of("tar -xzpf", fs, "seconds"),
        "s",
        {
          text: "<= 1.2x",
          pass: (o, b) => o / b <= 1.2,
        },
      );
      if (umoci) {
        row(
          "extract vs umoci unpack (wall time)",
          fs,
          runtime,
          of(side.name, fs, "seconds"),
          of("umoci unpack", fs, "seconds"),
          "s",
        );
      }
      row("peak RSS - idle, extract", fs, runtime, of(side.name, fs, "aboveIdleMiB"), [], "MiB", {
        text: "< 64 MiB",
        pass: (o) => o < 64,
      });
      row(
        "peak RSS of the process tree vs tar -xzpf",
        fs,
        runtime,
        of(side.name, fs, "treeMiB"),
        of("tar -xzpf", fs, "treeMiB"),
        "MiB",
      );
      if (umoci) {
        row(
          "peak RSS of the process tree vs umoci unpack",
          fs,
          runtime,
          of(side.name, fs, "treeMiB"),
          of("umoci unpack", fs, "treeMiB"),
          "MiB",
        );
      }
    }
  }
  const table = lines.join("\n");
  // deno-lint-ignore no-console
  console.log(table);
  if (options.out) writeFileSync(options.out, table + "\n");
}

main();
