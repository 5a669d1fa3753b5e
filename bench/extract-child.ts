/**
 * One `extract` of an image in a fresh process of whichever runtime runs it, as the CLI's
 * `extract REF DIR` does it (spawn, open, extractImage, shutdown): bench/extract.ts starts it once per
 * run and reads the one JSON line it prints, with the process's RSS before the extraction (after spawn
 * and OpenImage: what the process holds when idle) and its peak.
 *
 *   extract-child.ts '{"skopeoCmd":[...],"ref":"oci:DIR:latest","dir":"OUT"}'
 *
 * @module
 */

import process from "node:process";
import type * as Library from "../mod.ts";
import type * as Extract from "../src/image/extract.ts";

// BENCH_LIB (extract.ts --lib DIR) measures a scratch copy of the library instead of this checkout.
const lib = process.env.BENCH_LIB;
const { ImageProxy }: typeof Library = await import(lib ? `${lib}/mod.ts` : "../mod.ts");
const { extractImage }: typeof Extract = await import(
  lib ? `${lib}/src/image/extract.ts` : "../src/image/extract.ts"
);

/** What extract.ts asks for. */
export interface ExtractTask {
  skopeoCmd: string[];
  ref: string;
  dir: string;
}

const task: ExtractTask = JSON.parse(process.argv[2]);
const proxy = await ImageProxy.spawn({ skopeoCmd: task.skopeoCmd });
try {
  const image = await proxy.openImage(task.ref);
  const idleKiB = process.memoryUsage().rss / 1024;
  const start = performance.now();
  const result = await extractImage(proxy, image, task.dir);
  const ms = performance.now() - start;
  // getrusage's ru_maxrss is VmHWM; Deno refuses to read /proc without --allow-all.
  const peakKiB = process.resourceUsage().maxRSS;
  const entries = result.layers.reduce((n, l) => n + l.entries, 0);
  // deno-lint-ignore no-console
  console.log(JSON.stringify({ idleKiB, peakKiB, extractMs: ms, entries }));
} finally {
  await proxy.shutdown();
}
