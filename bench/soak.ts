/**
 * The soak test: thousands of open / manifest / blob / close cycles on one proxy, then on a pool of
 * proxies working at once, on every skopeo server the tests use. It samples this process's open fds,
 * memory and child processes at the start, periodically and at the end, prints a short table, and
 * exits 1 when fds or children leaked, memory grew past a bound, or any cycle failed. Not part of the
 * default test run.
 *
 *   deno run --allow-read --allow-write --allow-run --allow-env --allow-ffi bench/soak.ts [options]
 *   bun bench/soak.ts [options]
 *   node --expose-gc --import tsx bench/soak.ts [options]
 *
 * (Deno measures the heap after a collection only with `--v8-flags=--expose-gc`; Bun always does.)
 *
 * Options: `--quick` (about 25 s in all: the CI run), `--seconds S` (per phase; default 60),
 * `--cycles N` (per phase, whichever of the two limits comes first; default unlimited), `--pool N`
 * (proxies in the pool phase; default 4), `--server NAME` (substring of "skopeo 1.22.0", repeatable),
 * `--max-growth-mib M` (allowed growth of the heap, and a quarter of the allowed growth of RSS in
 * MiB; default 32), `--sample-seconds S` (default 2; 1 with --quick).
 *
 * "Start" is measured after one warm-up cycle on a proxy that is then shut down, so that what the
 * runtime opens once (its own pipes, FFI libraries, thread-pool wakeups) is not counted as a leak.
 *
 * @module
 */

import { execFileSync } from "node:child_process";
import process from "node:process";
import { ImageProxy } from "../mod.ts";
import { openFds, RUNTIME, type Server, SERVERS } from "../tests/helpers/env.ts";
import { buildFixtures } from "../tests/helpers/fixtures.ts";
import { childPids } from "../tests/helpers/concurrency-procs.ts";

const MiB = 1 << 20;
/** Cycles per warm-up proxy (three of them, one after the other). */
const WARM_UP_CYCLES = 150;

interface Options {
  seconds: number;
  cycles: number;
  pool: number;
  servers: string[];
  maxGrowthMiB: number;
  sampleSeconds: number;
  quick: boolean;
}

function usage(problem: string): never {
  // deno-lint-ignore no-console
  console.error(
    `soak: ${problem}\nusage: soak.ts [--quick] [--seconds S] [--cycles N] [--pool N] ` +
      `[--server NAME]... [--max-growth-mib M] [--sample-seconds S]`,
  );
  process.exit(2);
}

function parseOptions(argv: string[]): Options {
  const options: Options = {
    seconds: 60,
    cycles: Infinity,
    pool: 4,
    servers: [],
    maxGrowthMiB: 32,
    sampleSeconds: 2,
    quick: false,
  };
  let secondsGiven = false;
  let sampleGiven = false;
  const positive = (flag: string, text: string, integer: boolean) => {
    const value = Number(text);
    if (!(value > 0) || (integer && !Number.isInteger(value))) usage(`${flag} needs a positive number`);
    return value;
  };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => inline ?? argv[++i] ?? usage(`${flag} needs a value`);
    switch (flag) {
      case "--quick":
        options.quick = true;
        break;
      case "--seconds":
        options.seconds = positive(flag, value(), false);
        secondsGiven = true;
        break;
      case "--cycles":
        options.cycles = positive(flag, value(), true);
        break;
      case "--pool":
        options.pool = positive(flag, value(), true);
        break;
      case "--server":
        options.servers.push(value());
        break;
      case "--max-growth-mib":
        options.maxGrowthMiB = positive(flag, value(), false);
        break;
      case "--sample-seconds":
        options.sampleSeconds = positive(flag, value(), false);
        sampleGiven = true;
        break;
      default:
        usage(`unknown option ${argv[i]}`);
    }
  }
  if (options.quick) {
    // Two phases per server, both servers: about 20 s of cycles plus start-up and shutdowns.
    if (!secondsGiven) options.seconds = 5;
    if (!sampleGiven) options.sampleSeconds = 1;
  }
  return options;
}

/** One measurement of this process. */
interface Sample {
  at: number;
  label: string;
  cycles: number;
  fds: number;
  children: number;
  rss: number;
  heapUsed: number;
}

function collectGarbage(): void {
  const g = globalThis as unknown as { gc?: () => void; Bun?: { gc(force: boolean): void } };
  if (g.Bun) g.Bun.gc(true);
  else g.gc?.();
}

const started = Date.now();
function sample(label: string, cycles: number, gc = false): Sample {
  if (gc) collectGarbage();
  const memory = process.memoryUsage();
  return {
    at: (Date.now() - started) / 1000,
    label,
    cycles,
    fds: openFds().size,
    children: childPids().length,
    rss: memory.rss,
    heapUsed: memory.heapUsed,
  };
}

/** The open fds of the proxies' processes, summed: what the server side holds (reported, not judged). */
function serverFds(pool: ImageProxy[]): number {
  let total = 0;
  for (const proxy of pool) {
    try {
      const out = execFileSync("ls", [`/proc/${proxy.pid}/fd`], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "ignore"],
      });
      total += out.split("\n").filter((line) => line !== "").length;
    } catch { /* gone */ }
  }
  return total;
}

/** What one phase did. */
interface PhaseResult {
  server: string;
  phase: string;
  cycles: number;
  bytes: number;
  seconds: number;
  errors: string[];
  peakFds: number;
  peakChildren: number;
  peakRss: number;
  /** skopeo's own open fds (all proxies of the phase) after spawning and at the end of the cycles. */
  serverFds: [number, number];
}

/** The fixture every cycle opens: two gzip'd layers of 300 KB and 2.5 MB. */
const fixtures = buildFixtures();
const REF = `oci:${fixtures.layout}:latest`;

/**
 * One cycle: open, fetch the manifest, stream one layer to its end (the small one mostly, the large
 * one every eighth cycle, alternately with GetRawBlob where the proxy has it), close. Every sixteenth
 * cycle cancels the large layer after its first chunk instead.
 */
async function cycle(proxy: ImageProxy, n: number): Promise<number> {
  const img = await proxy.openImage(REF);
  const { digest, manifest } = await proxy.fetchManifest(img);
  if (digest !== fixtures.image.manifest.digest) throw new Error(`Unexpected manifest digest ${digest}`);
  if (n % 16 === 15) {
    // A reader that gives up half-way: the stream is cancelled with bytes still due.
    const { stream } = await proxy.getDescriptor(img, manifest.layers[1]);
    const reader = stream.getReader();
    const { value } = await reader.read();
    await reader.cancel();
    await proxy.closeImage(img);
    return value?.length ?? 0;
  }
  const layer = manifest.layers[n % 8 === 7 ? 1 : 0];
  const raw = proxy.supports("GetRawBlob") && n % 2 === 1;
  const { stream } = raw ? await proxy.getRawBlob(img, layer.digest) : await proxy.getDescriptor(img, layer);
  let bytes = 0;
  for await (const chunk of stream) bytes += chunk.length;
  if (bytes !== layer.size) throw new Error(`Layer ${layer.digest}: ${bytes} of ${layer.size} bytes`);
  await proxy.closeImage(img);
  return bytes;
}

async function runPhase(
  server: Server,
  phase: string,
  proxies: number,
  options: Options,
  samples: Sample[],
): Promise<PhaseResult> {
  const result: PhaseResult = {
    server: server.name,
    phase,
    cycles: 0,
    bytes: 0,
    seconds: 0,
    errors: [],
    peakFds: 0,
    peakChildren: 0,
    peakRss: 0,
    serverFds: [0, 0],
  };
  const observe = (label: string) => {
    const s = sample(label, result.cycles);
    samples.push(s);
    result.peakFds = Math.max(result.peakFds, s.fds);
    result.peakChildren = Math.max(result.peakChildren, s.children);
    result.peakRss = Math.max(result.peakRss, s.rss);
  };
  const pool = await Promise.all(
    Array.from({ length: proxies }, () => ImageProxy.spawn({ skopeoCmd: server.skopeoCmd })),
  );
  observe(`${phase}: spawned`);
  result.serverFds[0] = serverFds(pool);
  const t0 = performance.now();
  const deadline = t0 + options.seconds * 1000;
  let claimed = 0;
  let nextSample = t0 + options.sampleSeconds * 1000;
  const worker = async (proxy: ImageProxy) => {
    while (performance.now() < deadline && claimed < options.cycles && result.errors.length === 0) {
      const n = claimed++;
      try {
        const bytes = await cycle(proxy, n);
        result.bytes += bytes;
        result.cycles++;
      } catch (err) {
        result.errors.push(`cycle ${n}: ${(err as Error).message}`);
      }
      if (performance.now() >= nextSample) {
        nextSample += options.sampleSeconds * 1000;
        observe(`${phase}: running`);
      }
    }
  };
  await Promise.all(pool.map(worker));
  result.seconds = (performance.now() - t0) / 1000;
  observe(`${phase}: done`);
  result.serverFds[1] = serverFds(pool);
  for (const proxy of pool) {
    await proxy.shutdown().catch((err) => result.errors.push(`shutdown: ${(err as Error).message}`));
  }
  return result;
}

/** Waits, polling, until the child count is back to `count` (reaping takes a moment). */
async function settleChildren(count: number, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (childPids().length > count && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
}

function mib(bytes: number): string {
  return (bytes / MiB).toFixed(1);
}

function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  return [line(headers), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n");
}

async function main(): Promise<number> {
  const options = parseOptions(process.argv.slice(2));
  const servers = SERVERS.filter((s) =>
    options.servers.length === 0 || options.servers.some((name) => s.name.includes(name))
  );
  if (servers.length === 0) usage("no skopeo server matches (see tests/helpers/env.ts)");

  // Warm-up: what the runtime opens once is part of the baseline, not a leak. Deno, for one, opens a
  // SOCK_STREAM socketpair for itself (both ends its own) once, some hundreds of cycles in.
  for (let round = 0; round < 3; round++) {
    const proxy = await ImageProxy.spawn({ skopeoCmd: servers[0].skopeoCmd });
    for (let n = 0; n < WARM_UP_CYCLES; n++) await cycle(proxy, n);
    await proxy.shutdown();
    await settleChildren(0, 5000);
  }
  const samples: Sample[] = [];
  const startFdMap = openFds();
  const start = sample("start", 0, true);
  samples.push(start);

  const results: PhaseResult[] = [];
  for (const server of servers) {
    results.push(await runPhase(server, `${server.name}, 1 proxy`, 1, options, samples));
    results.push(
      await runPhase(server, `${server.name}, pool of ${options.pool}`, options.pool, options, samples),
    );
  }
  await settleChildren(start.children, 5000);
  const end = sample("end", results.reduce((n, r) => n + r.cycles, 0), true);
  samples.push(end);

  const out = (text: string) => {
    // deno-lint-ignore no-console
    console.log(text);
  };
  out(
    `\n## Soak: ${RUNTIME}, ${options.seconds} s per phase${
      Number.isFinite(options.cycles) ? ` or ${options.cycles} cycles` : ""
    }\n`,
  );
  out(table(
    [
      "phase",
      "cycles",
      "cycles/s",
      "MiB/s",
      "errors",
      "peak fds",
      "peak children",
      "peak RSS MiB",
      "skopeo fds",
    ],
    results.map((r) => [
      r.phase,
      String(r.cycles),
      (r.cycles / r.seconds).toFixed(1),
      (r.bytes / MiB / r.seconds).toFixed(1),
      String(r.errors.length),
      String(r.peakFds),
      String(r.peakChildren),
      mib(r.peakRss),
      `${r.serverFds[0]} -> ${r.serverFds[1]}`,
    ]),
  ));
  out("");
  const shown = samples.length <= 14
    ? samples
    : samples.filter((_, i) =>
      i === 0 || i === samples.length - 1 || i % Math.ceil(samples.length / 12) === 0
    );
  out(table(
    ["t (s)", "when", "cycles", "fds", "children", "RSS MiB", "heap MiB"],
    shown.map((s) => [
      s.at.toFixed(1),
      s.label,
      String(s.cycles),
      String(s.fds),
      String(s.children),
      mib(s.rss),
      mib(s.heapUsed),
    ]),
  ));

  const problems: string[] = [];
  for (const r of results) {
    for (const error of r.errors.slice(0, 5)) problems.push(`${r.phase}: ${error}`);
  }
  if (end.fds !== start.fds) {
    const endFdMap = openFds();
    const changed = [...new Set([...startFdMap.keys(), ...endFdMap.keys()])]
      .filter((fd) => startFdMap.get(fd) !== endFdMap.get(fd))
      .map((fd) => `${fd}: ${startFdMap.get(fd) ?? "-"} -> ${endFdMap.get(fd) ?? "-"}`);
    problems.push(`fds: ${start.fds} at the start, ${end.fds} at the end (${changed.join(", ")})`);
  }
  if (end.children !== start.children) {
    problems.push(`child processes: ${start.children} at the start, ${end.children} at the end`);
  }
  const heapGrowth = (end.heapUsed - start.heapUsed) / MiB;
  const rssGrowth = (end.rss - start.rss) / MiB;
  if (heapGrowth > options.maxGrowthMiB) {
    problems.push(`heap grew by ${heapGrowth.toFixed(1)} MiB (bound ${options.maxGrowthMiB} MiB)`);
  }
  if (rssGrowth > options.maxGrowthMiB * 4) {
    problems.push(`RSS grew by ${rssGrowth.toFixed(1)} MiB (bound ${options.maxGrowthMiB * 4} MiB)`);
  }
  out(
    `\nstart -> end: fds ${start.fds} -> ${end.fds}, children ${start.children} -> ${end.children}, ` +
      `RSS ${mib(start.rss)} -> ${mib(end.rss)} MiB, heap ${mib(start.heapUsed)} -> ${mib(end.heapUsed)} MiB`,
  );
  if (problems.length > 0) {
    out(`\nFAILED:\n${problems.map((p) => `- ${p}`).join("\n")}`);
    return 1;
  }
  out("\nOK: fds and children flat, memory bounded, no cycle failed");
  return 0;
}

process.exit(await main());
