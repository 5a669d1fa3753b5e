/**
 * The benchmark suite: our client against a minimal native client (bench/baseline.c) and against
 * `skopeo copy`, on every skopeo server the tests use, printed as one Markdown table.
 *
 *   deno run --allow-read --allow-write --allow-run --allow-env --allow-ffi bench/run.ts [options]
 *   bun bench/run.ts [options]
 *   node --import tsx bench/run.ts [options]
 *
 * Options: `--quick` (small blobs, one run each: the CI smoke run), `--runs N`, `--runtime
 * deno|bun|node` (which runtime runs our client; repeatable; default: all three, one after the other,
 * each against its own baseline runs, in one table), `--server NAME` (substring
 * of "skopeo 1.22.0", repeatable), `--only METRIC` (substring, repeatable), `--out FILE` (also write
 * the table), `--json FILE` (every run's raw result, one JSON line each), `--lib DIR` (measure a
 * scratch copy of the library, DIR/mod.ts, instead of this checkout: for trying changes to src/),
 * `--fetch own` (whole-image fetch with the bench's own writer even when the CLI has `fetch --output`).
 *
 * Every measurement of our client runs in a fresh process of the runtime (bench/client.ts), so peak
 * RSS is that of a process that did nothing but the measured work; runs of our client and of the
 * baseline alternate, and the table shows medians. See bench/README.md.
 *
 * @module
 */

import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { type Server, SERVERS } from "../tests/helpers/env.ts";
import type { ClientTask } from "./client.ts";

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(BENCH, "..");
const MiB = 1 << 20;
const GiB = 1 << 30;
/** The pipe size the library grows blob pipes to, used for the GetRawBlob baseline too. */
const PIPE_SIZE = MiB;
/** Deno permissions for bench/client.ts (and for this script: the same list). */
const DENO_PERMISSIONS = ["--allow-read", "--allow-write", "--allow-run", "--allow-env", "--allow-ffi"];
/** A run that takes longer than this is killed (its skopeo dies with it through setpriv). */
const RUN_TIMEOUT_MS = 300_000;

const RUNTIMES = ["deno", "bun", "node"] as const;
type Runtime = typeof RUNTIMES[number];

interface Options {
  quick: boolean;
  runs: number;
  runtimes: Runtime[];
  servers: string[];
  only: string[];
  out?: string;
  json?: string;
  /** A scratch copy of the library to measure instead of this checkout (its mod.ts). */
  lib?: string;
  /** Whole-image fetch with the CLI when it has `fetch --output` (auto), or always with the bench's own. */
  fetch: "auto" | "own";
}

function parseOptions(argv: string[]): Options {
  const options: Options = {
    quick: false,
    runs: 5,
    runtimes: [],
    servers: [],
    only: [],
    fetch: "auto",
  };
  let runsGiven = false;
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => inline ?? argv[++i] ?? usage(`${flag} needs a value`);
    switch (flag) {
      case "--quick":
        options.quick = true;
        break;
      case "--runs":
        options.runs = Number(value());
        runsGiven = true;
        if (!Number.isInteger(options.runs) || options.runs < 1) usage("--runs needs a positive integer");
        break;
      case "--runtime": {
        const name = value();
        const runtime = RUNTIMES.find((r) => r === name);
        if (!runtime) usage('--runtime is "deno", "bun" or "node"');
        options.runtimes.push(runtime);
        break;
      }
      case "--server":
        options.servers.push(value());
        break;
      case "--only":
        options.only.push(value().toLowerCase());
        break;
      case "--out":
        options.out = value();
        break;
      case "--json":
        options.json = value();
        break;
      case "--fetch": {
        const how = value();
        if (how !== "auto" && how !== "own") usage('--fetch is "auto" or "own"');
        options.fetch = how;
        break;
      }
      case "--lib":
        options.lib = resolve(value(), "mod.ts");
        if (!existsSync(options.lib)) usage(`--lib: ${options.lib} does not exist`);
        break;
      case "--help":
      case "-h":
        usage();
        break;
      default:
        usage(`Unknown option "${argv[i]}"`);
    }
  }
  if (options.quick && !runsGiven) options.runs = 1;
  if (options.runtimes.length === 0) options.runtimes = [...RUNTIMES];
  return options;
}

function usage(problem?: string): never {
  const text = "usage: bench/run.ts [--quick] [--runs N] [--runtime deno|bun|node]... [--server NAME]... " +
    "[--only METRIC]... [--out FILE] [--json FILE] [--lib DIR] [--fetch auto|own]\n";
  process.stderr.write(problem ? `error: ${problem}\n${text}` : text);
  process.exit(problem ? 2 : 0);
}

function log(text: string): void {
  process.stderr.write(text + "\n");
}

// ---------------------------------------------------------------------------------------------------
// Fixtures: the baseline binary and an OCI layout, both cached under the temp dir.

interface Blob {
  digest: string;
  size: number;
}

interface Fixture {
  layout: string;
  /** `big`: one layer of `big.size` bytes. */
  big: Blob;
  /** `four`: four layers (distinct content), the concurrency and whole-image fetch image. */
  parts: Blob[];
}

function sh(command: string, args: string[], options: { input?: string } = {}): string {
  return execFileSync(command, args, { encoding: "utf8", stdio: ["pipe", "pipe", "inherit"], ...options });
}

function compileBaseline(work: string): string {
  const source = join(BENCH, "baseline.c");
  const hash = createHash("sha256").update(readFileSync(source)).digest("hex").slice(0, 16);
  const binary = join(work, `baseline-${hash}`);
  if (!existsSync(binary)) {
    log(`compiling ${source}`);
    sh("cc", ["-O2", "-Wall", "-o", `${binary}.tmp`, source]);
    renameSync(`${binary}.tmp`, binary);
  }
  return binary;
}

/** Incompressible random bytes, written and hashed by coreutils (a 1 GiB blob takes seconds). */
function randomBlob(dir: string, size: number): Blob {
  const file = join(dir, "incoming");
  sh("sh", ["-c", 'head -c "$1" /dev/urandom > "$2"', "sh", String(size), file]);
  const hex = sh("sha256sum", [file]).split(" ")[0];
  renameSync(file, join(dir, hex));
  return { digest: `sha256:${hex}`, size };
}

function jsonBlob(dir: string, value: unknown): Blob & { mediaType?: string } {
  const bytes = new TextEncoder().encode(JSON.stringify(value));
  const hex = createHash("sha256").update(bytes).digest("hex");
  writeFileSync(join(dir, hex), bytes);
  return { digest: `sha256:${hex}`, size: bytes.length };
}

function buildLayout(work: string, bigSize: number, partSize: number): Fixture {
  const root = join(work, `layout-${bigSize}-${partSize}`);
  const stamp = join(root, "fixture.json");
  if (existsSync(stamp)) return JSON.parse(readFileSync(stamp, "utf8"));
  log(
    `building an OCI layout with ${bigSize / MiB} MiB + 4 x ${
      partSize / MiB
    } MiB of random layers in ${root}`,
  );
  const building = `${root}.build-${process.pid}`;
  rmSync(building, { recursive: true, force: true });
  const layout = join(building, "layout");
  const blobs = join(layout, "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  const image = (layers: Blob[]) => {
    // Uncompressed "tar" layers: the point is bytes through the pipe, not what they unpack to.
    const config = jsonBlob(blobs, {
      architecture: "amd64",
      os: "linux",
      config: {},
      rootfs: { type: "layers", diff_ids: layers.map((l) => l.digest) },
    });
    const manifest = jsonBlob(blobs, {
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
      layers: layers.map((l) => ({ mediaType: "application/vnd.oci.image.layer.v1.tar", ...l })),
    });
    return { mediaType: "application/vnd.oci.image.manifest.v1+json", ...manifest };
  };
  const big = randomBlob(blobs, bigSize);
  const parts = [0, 1, 2, 3].map(() => randomBlob(blobs, partSize));
  writeFileSync(join(layout, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    join(layout, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        { ...image([big]), annotations: { "org.opencontainers.image.ref.name": "big" } },
        { ...image(parts), annotations: { "org.opencontainers.image.ref.name": "four" } },
      ],
    }),
  );
  const fixture: Fixture = { layout: join(root, "layout"), big, parts };
  writeFileSync(join(building, "fixture.json"), JSON.stringify(fixture));
  rmSync(root, { recursive: true, force: true });
  renameSync(building, root);
  return fixture;
}

// ---------------------------------------------------------------------------------------------------
// Running one measurement.

type Result = Record<string, number> & { wallSeconds: number };

/** The command that runs a TypeScript file under `runtime` (Node through the `tsx` loader). */
function runtimeCommand(runtime: Runtime): string[] {
  const current = "Bun" in globalThis ? "bun" : "Deno" in globalThis ? "deno" : "node";
  const binary = runtime === current
    ? process.execPath
    : [join(ROOT, ".tools", "bin", runtime)].find(existsSync) ??
      runtime;
  if (runtime === "deno") return [binary, "run", ...DENO_PERMISSIONS];
  if (runtime === "node") return [binary, "--import", "tsx"];
  return [binary];
}

/** Runs a command to completion; returns its last stdout line parsed as JSON, plus the wall time. */
function runJson(argv: string[], what: string, env?: Record<string, string>): Result {
  const start = performance.now();
  const child = spawnSync(argv[0], argv.slice(1), {
    cwd: ROOT,
    env: env ? { ...process.env, ...env } : undefined,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    timeout: RUN_TIMEOUT_MS,
    killSignal: "SIGKILL",
    maxBuffer: 16 * MiB,
  });
  const wallSeconds = (performance.now() - start) / 1e3;
  const line = (child.stdout ?? "").trim().split("\n").pop() ?? "";
  let parsed: Record<string, unknown> | undefined;
  try {
    parsed = JSON.parse(line);
  } catch { /* reported below */ }
  if (child.status !== 0 || !parsed || parsed.ok === false) {
    const detail = (parsed?.error as string | undefined) ??
      `${child.stderr ?? ""}${child.error ?? ""}`.trim();
    throw new Error(`${what} failed (status ${child.status ?? child.signal}): ${detail.split("\n")[0]}`);
  }
  return { ...(parsed as Record<string, number>), wallSeconds };
}

class Bench {
  readonly rows: Row[] = [];
  readonly raw: string[] = [];
  /** The runtime that runs our client in the rows being measured. */
  runtime: Runtime = "deno";
  constructor(readonly options: Options, readonly baseline: string, readonly fixture: Fixture) {}

  /** Adds a row for the current runtime. */
  add(row: Omit<Row, "runtime">): void {
    this.rows.push({ ...row, runtime: this.runtime });
  }

  wanted(metric: string): boolean {
    return this.options.only.length === 0 || this.options.only.some((o) => metric.toLowerCase().includes(o));
  }

  ours(server: Server, task: Omit<ClientTask, "skopeoCmd">): Result {
    const full: ClientTask = { ...task, skopeoCmd: server.skopeoCmd };
    const result = runJson(
      [...runtimeCommand(this.runtime), join(BENCH, "client.ts"), JSON.stringify(full)],
      `${this.runtime} client ${task.mode}`,
      this.options.lib ? { BENCH_LIB: this.options.lib } : undefined,
    );
    this.raw.push(
      JSON.stringify({
        side: "ours",
        runtime: this.runtime,
        server: server.name,
        ...task,
        blobs: undefined,
        result,
      }),
    );
    return result;
  }

  base(server: Server, mode: string, ref: string, blob?: Blob, count = 0, pipeSize = 0): Result {
    const argv = [
      this.baseline,
      mode,
      ref,
      blob?.digest ?? "-",
      String(blob?.size ?? 0),
      String(count),
      String(pipeSize),
      "--",
      ...server.skopeoCmd,
    ];
    const result = runJson(argv, `baseline ${mode}`);
    this.raw.push(JSON.stringify({ side: "baseline", server: server.name, mode, pipeSize, result }));
    return result;
  }

  command(server: Server, argv: string[], what: string): Result {
    const start = performance.now();
    const child = spawnSync(argv[0], argv.slice(1), {
      cwd: ROOT,
      stdio: ["ignore", "ignore", "pipe"],
      timeout: RUN_TIMEOUT_MS,
      killSignal: "SIGKILL",
    });
    const wallSeconds = (performance.now() - start) / 1e3;
    if (child.status !== 0) {
      throw new Error(
        `${what} failed (status ${child.status ?? child.signal}): ${String(child.stderr).trim()}`,
      );
    }
    this.raw.push(JSON.stringify({ side: what, server: server.name, result: { wallSeconds } }));
    return { wallSeconds } as Result;
  }

  /** Alternates ours and the baseline, `runs` times each; a failing side is recorded, not fatal. */
  pairs(
    metric: string,
    server: Server,
    ours: () => number,
    base: () => number,
    spec: Omit<Row, "metric" | "server" | "runtime" | "ours" | "base">,
  ): void {
    if (!this.wanted(metric)) return;
    const o: number[] = [];
    const b: number[] = [];
    let error: string | undefined;
    for (let i = 0; i < this.options.runs; i++) {
      for (const [side, list, fn] of [["ours", o, ours], ["baseline", b, base]] as const) {
        try {
          list.push(fn());
        } catch (err) {
          error ??= `${side}: ${(err as Error).message}`;
        }
      }
      log(
        `  ${metric} [${server.name}] run ${i + 1}: ours ${fmt(spec.unit, o.at(-1))}, baseline ${
          fmt(spec.unit, b.at(-1))
        }`,
      );
    }
    this.add({ metric, server: server.name, ours: o, base: b, error, ...spec });
  }
}

// ---------------------------------------------------------------------------------------------------
// Statistics and the table.

interface Row {
  metric: string;
  server: string;
  runtime: Runtime;
  unit: "GiB/s" | "µs" | "ms" | "MiB" | "s";
  ours: number[];
  base: number[];
  /** How ours must compare with the baseline (medians). */
  target: { text: string; pass: (ours: number, base: number) => boolean } | undefined;
  /** "ratio" (ours / baseline) or "diff" (ours - baseline) in the ratio column. */
  compare: "ratio" | "diff";
  error?: string;
}

function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function fmt(unit: Row["unit"], value: number | undefined): string {
  if (value === undefined || Number.isNaN(value)) return "—";
  const digits = unit === "GiB/s" || unit === "s" ? 2 : 1;
  return `${value.toFixed(digits)} ${unit}`;
}

function spread(unit: Row["unit"], values: number[]): string {
  if (values.length < 2) return "";
  const digits = unit === "GiB/s" || unit === "s" ? 2 : 1;
  return `${Math.min(...values).toFixed(digits)}–${Math.max(...values).toFixed(digits)}`;
}

function table(rows: Row[], options: Options): string {
  const lines = [
    `| metric | server | runtime | ours | baseline | ratio | target | result | spread ours / baseline (n=${options.runs}) |`,
    "|---|---|---|---|---|---|---|---|---|",
  ];
  for (const row of rows) {
    const o = median(row.ours);
    const b = median(row.base);
    let ratio = "—";
    let result = "info";
    if (!Number.isNaN(o) && !Number.isNaN(b)) {
      ratio = row.compare === "ratio"
        ? `${(o / b).toFixed(2)}x`
        : `${o - b >= 0 ? "+" : ""}${(o - b).toFixed(1)} ${row.unit}`;
    }
    if (row.target) {
      const missing = Number.isNaN(o) || (row.base.length > 0 && Number.isNaN(b));
      result = missing ? "ERROR" : row.target.pass(o, b) ? "pass" : "FAIL";
    }
    if (row.error) result = Number.isNaN(o) ? `ERROR: ${row.error}` : `${result} (${row.error})`;
    lines.push(
      `| ${row.metric} | ${row.server} | ${row.runtime} | ${fmt(row.unit, o)} | ${
        fmt(row.unit, b)
      } | ${ratio} | ${row.target?.text ?? "—"} | ${result} | ${spread(row.unit, row.ours)} / ${
        spread(row.unit, row.base)
      } |`,
    );
  }
  return lines.join("\n");
}

// ---------------------------------------------------------------------------------------------------
// The measurements.

function benchServer(bench: Bench, server: Server): void {
  const { fixture, options } = bench;
  const big = `oci:${fixture.layout}:big`;
  const four = `oci:${fixture.layout}:four`;
  const raw = server.protocol >= "0.2.8";
  const bigLabel = options.quick ? `${fixture.big.size / MiB} MiB` : `${fixture.big.size / GiB} GiB`;
  const rss: number[] = [];
  const rawRss: number[] = [];

  bench.pairs(
    `getBlob ${bigLabel}`,
    server,
    () => {
      const r = bench.ours(server, { mode: "getblob", ref: big, ...fixture.big });
      rss.push(r.peakMinusIdleMiB);
      return r.gibps;
    },
    () => bench.base(server, "getblob", big, fixture.big).gibps,
    { unit: "GiB/s", compare: "ratio", target: { text: ">= 0.9x", pass: (o, b) => o >= 0.9 * b } },
  );
  if (raw) {
    const rawBase: number[] = [];
    bench.pairs(
      `getRawBlob + client digest ${bigLabel} vs GetBlob`,
      server,
      () => {
        const r = bench.ours(server, { mode: "rawblob", ref: big, ...fixture.big });
        rawRss.push(r.peakMinusIdleMiB);
        return r.gibps;
      },
      () => {
        const b = bench.base(server, "rawblob", big, fixture.big, 0, PIPE_SIZE).gibps;
        rawBase.push(b);
        return bench.base(server, "getblob", big, fixture.big).gibps;
      },
      { unit: "GiB/s", compare: "ratio", target: { text: ">= 1.0x", pass: (o, b) => o >= b } },
    );
    const last = bench.rows.at(-1);
    if (last?.metric.startsWith("getRawBlob")) {
      bench.add({
        ...last,
        metric: `getRawBlob + client digest ${bigLabel} vs GetRawBlob (1 MiB pipe)`,
        base: rawBase,
        target: undefined,
        error: undefined,
      });
    }
  }
  // The same runs also give the mean: on 2 cores both clients switch between a fast and a slow mode
  // (see README.md), and the mean shows the mix that a median of one run hides.
  const rttMeans = { ours: [] as number[], base: [] as number[] };
  const rttCount = options.quick ? 200 : 2000;
  bench.pairs(
    "request round trip (CloseImage, missing id), median",
    server,
    () => {
      const r = bench.ours(server, { mode: "rtt", ref: big, count: rttCount });
      rttMeans.ours.push(r.mean_us);
      return r.median_us;
    },
    () => {
      const r = bench.base(server, "rtt", big, undefined, rttCount);
      rttMeans.base.push(r.mean_us);
      return r.median_us;
    },
    { unit: "µs", compare: "ratio", target: { text: "<= 3x", pass: (o, b) => o <= 3 * b } },
  );
  const rtt = bench.rows.at(-1);
  if (rtt?.metric.startsWith("request round trip") && rttMeans.ours.length > 0) {
    bench.add({
      ...rtt,
      metric: "request round trip (CloseImage, missing id), mean",
      ours: rttMeans.ours,
      base: rttMeans.base,
      target: undefined,
      error: undefined,
    });
  }
  bench.pairs(
    "spawn to ready (Initialize reply)",
    server,
    () => bench.ours(server, { mode: "rtt", ref: big, count: 1 }).spawnMs,
    () => bench.base(server, "spawn", big).ms,
    { unit: "ms", compare: "diff", target: { text: "<= baseline + 20 ms", pass: (o, b) => o <= b + 20 } },
  );
  for (const [method, values] of [["getBlob", rss], ["getRawBlob", rawRss]] as const) {
    if (!bench.wanted(`peak RSS - idle`) || values.length === 0) continue;
    bench.add({
      metric: `peak RSS - idle, ${method} ${bigLabel}`,
      server: server.name,
      unit: "MiB",
      ours: values,
      base: [],
      compare: "diff",
      target: { text: "< 64 MiB", pass: (o) => o < 64 },
    });
  }
  const partLabel = `${fixture.parts[0].size / MiB} MiB`;
  bench.pairs(
    `4 x ${partLabel} concurrent (ours) vs sequential (baseline), one proxy`,
    server,
    () => bench.ours(server, { mode: "concurrent", ref: four, blobs: fixture.parts }).seconds,
    () => bench.ours(server, { mode: "sequential", ref: four, blobs: fixture.parts }).seconds,
    { unit: "s", compare: "ratio", target: { text: "<= 1.0x", pass: (o, b) => o <= b } },
  );

  const cli = options.fetch === "auto" && !options.lib ? fetchCli() : undefined;
  const dest = join(tmpdir(), `cip-bench-fetch-${process.pid}`);
  // Each run writes and fsyncs 1 GiB; sync(1) after removing it, so that the file system's deferred
  // work for the last run (freeing its blocks, committing its journal) is not timed in the next one.
  // Measured by hand on skopeo 1.22 before saveBlob: our fetch took 2.2-2.7 s unsynced and 1.7 s
  // synced, skopeo copy 1.5-1.6 s either way.
  const fresh = () => {
    rmSync(dest, { recursive: true, force: true });
    sh("sync", []);
  };
  bench.pairs(
    `whole image (4 x ${partLabel}) to OCI layout: ${
      cli ? "image-proxy fetch --output" : "bench's own getBlob-to-files"
    } vs skopeo copy`,
    server,
    () => {
      fresh();
      try {
        if (cli) {
          return bench.command(
            server,
            [
              ...runtimeCommand(bench.runtime),
              cli,
              "--skopeo",
              server.skopeoCmd.join(" "),
              "fetch",
              four,
              "--output",
              dest,
            ],
            "image-proxy fetch",
          ).wallSeconds;
        }
        return bench.ours(server, { mode: "fetch", ref: four, output: dest }).wallSeconds;
      } finally {
        fresh();
      }
    },
    () => {
      fresh();
      try {
        return bench.command(
          server,
          [...server.binary, "copy", "-q", four, `oci:${dest}:four`],
          "skopeo copy",
        )
          .wallSeconds;
      } finally {
        fresh();
      }
    },
    { unit: "s", compare: "ratio", target: { text: "<= 1.1x", pass: (o, b) => o <= 1.1 * b } },
  );
}

/** The `image-proxy` CLI, when it has learnt `fetch --output`; undefined until then. */
function fetchCli(): string | undefined {
  const dir = join(ROOT, "src", "cli");
  const main = join(dir, "main.ts");
  if (!existsSync(main)) return undefined;
  const text = readdirSync(dir).filter((name) => name.endsWith(".ts"))
    .map((name) => readFileSync(join(dir, name), "utf8")).join("\n");
  return /["'`]--output["'`]/.test(text) && /fetch REF/.test(text) ? main : undefined;
}

/** Running skopeo proxies (any: compared before and after to spot ones our runs left behind). */
function proxiesOf(): Set<number> {
  const pids = new Set<number>();
  for (const line of sh("ps", ["-eo", "pid=,args="]).split("\n")) {
    const match = /^\s*(\d+)\s+(.*)$/.exec(line);
    if (match && match[2].includes("experimental-image-proxy")) pids.add(Number(match[1]));
  }
  return pids;
}

function main(): void {
  const options = parseOptions(process.argv.slice(2));
  const work = join(process.env.BENCH_TMPDIR ?? tmpdir(), "cip-bench");
  mkdirSync(work, { recursive: true });
  const baseline = compileBaseline(work);
  const fixture = options.quick ? buildLayout(work, 16 * MiB, 4 * MiB) : buildLayout(work, GiB, 256 * MiB);
  // Warm the page cache so that the first run reads from memory like the others.
  sh("sh", ["-c", 'cat "$1"/blobs/sha256/* > /dev/null', "sh", fixture.layout]);
  const servers = SERVERS.filter((s) =>
    options.servers.length === 0 || options.servers.some((name) => s.name.includes(name))
  );
  if (servers.length === 0) usage("No skopeo server to measure (run .ci/setup)");
  const before = proxiesOf();
  const bench = new Bench(options, baseline, fixture);
  const started = performance.now();
  for (const server of servers) {
    for (const runtime of options.runtimes) {
      bench.runtime = runtime;
      log(
        `${server.name} (protocol ${server.protocol}), our client on ${runtime}, ${options.runs} run(s) each`,
      );
      benchServer(bench, server);
    }
  }
  const leftover = [...proxiesOf()].filter((pid) => !before.has(pid));
  if (leftover.length > 0) {
    log(
      `warning: skopeo proxies started during the benchmark are still running (ours, or another ` +
        `program's): ${leftover.join(", ")}`,
    );
  }
  const output = table(bench.rows, options) + "\n";
  process.stdout.write(output);
  log(
    `(${
      ((performance.now() - started) / 1e3).toFixed(0)
    } s; ${servers.length} server(s); medians of ${options.runs} run(s))`,
  );
  if (options.out) writeFileSync(options.out, output);
  if (options.json) writeFileSync(options.json, bench.raw.join("\n") + "\n");
  // Targets are for full runs on a quiet machine; a measurement that could not be made is a failure.
  process.exitCode = bench.rows.some((row) => row.error) ? 1 : 0;
}

main();
