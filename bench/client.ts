/**
 * One measurement with our client, in a fresh process of whichever runtime runs it (Deno, Bun or Node):
 * bench/run.ts starts it once per run and reads the one JSON line it prints. Runtime-agnostic: only
 * `node:` modules and the library's public API.
 *
 *   client.ts '{"mode":"getblob","skopeoCmd":[...],"ref":"oci:...","digest":"sha256:...","size":N}'
 *
 * Modes: `rtt` (spawn-to-ready, then COUNT CloseImage calls on a missing image), `getblob`,
 * `rawblob` (client-side digest), `concurrent` / `sequential` (several blobs on one proxy), `fetch`
 * (every blob of an image into an OCI layout, concurrently; stand-in while there is no fetch CLI).
 *
 * @module
 */

import { mkdirSync, writeFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { join } from "node:path";
import process from "node:process";
import type * as Library from "../mod.ts";
import { isEntryModule } from "../src/cli/io.ts";

// BENCH_LIB (run.ts --lib DIR) measures a scratch copy of the library instead of this checkout.
const { ImageProxy, OpenedImage, RequestError }: typeof Library = await import(
  process.env.BENCH_LIB ?? "../mod.ts"
);
type ImageProxy = Library.ImageProxy;
type OpenedImage = Library.OpenedImage;

/** What run.ts asks for. */
export interface ClientTask {
  mode: "rtt" | "getblob" | "rawblob" | "concurrent" | "sequential" | "fetch";
  skopeoCmd: string[];
  ref: string;
  digest?: string;
  size?: number;
  count?: number;
  blobs?: { digest: string; size: number }[];
  output?: string;
}

/**
 * VmRSS and VmHWM of this process. getrusage's ru_maxrss is the kernel's hiwater_rss, the number
 * /proc/self/status shows as VmHWM; Deno refuses to read /proc without --allow-all, so ask this way.
 */
function status(): { rssKiB: number; hwmKiB: number } {
  return { rssKiB: process.memoryUsage().rss / 1024, hwmKiB: process.resourceUsage().maxRSS };
}

async function consume(stream: ReadableStream<Uint8Array>): Promise<number> {
  const reader = stream.getReader();
  let bytes = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return bytes;
    bytes += value.length;
  }
}

async function run(task: ClientTask): Promise<Record<string, unknown>> {
  // The first spawn in the process: it also loads the runtime adapter and libc, as a user's does.
  const t0 = performance.now();
  const proxy = await ImageProxy.spawn({ skopeoCmd: task.skopeoCmd });
  const ready = performance.now();
  try {
    if (task.mode === "rtt") {
      // An image id that does not exist: the server takes the whole request path and fails fast.
      const missing = new OpenedImage(999999, (await proxy.openImage(task.ref)).reference);
      const count = task.count ?? 2000;
      const times = new Float64Array(count);
      const closeMissing = async () => {
        try {
          await proxy.closeImage(new OpenedImage(missing.id, missing.reference));
        } catch (err) {
          if (!(err instanceof RequestError)) throw err;
          return;
        }
        throw new Error("CloseImage on a missing image succeeded");
      };
      for (let i = 0; i < 200; i++) await closeMissing(); // warm up the JIT
      const start = performance.now();
      for (let i = 0; i < count; i++) {
        const a = performance.now();
        await closeMissing();
        times[i] = performance.now() - a;
      }
      const total = performance.now() - start;
      times.sort();
      // A second spawn, with the adapter loaded, only after the round trips: like the native client's,
      // they run right after their proxy's start, with no other skopeo started in between (one was
      // seen to leave the round trips in the slow mode described in README.md).
      const second0 = performance.now();
      const again = await ImageProxy.spawn({ skopeoCmd: task.skopeoCmd });
      const secondMs = performance.now() - second0;
      await again.shutdown();
      return {
        spawnMs: ready - t0,
        secondSpawnMs: secondMs,
        count,
        median_us: times[count >> 1] * 1e3,
        mean_us: total / count * 1e3,
      };
    }
    const img: OpenedImage = await proxy.openImage(task.ref);
    const idle = status();
    let bytes = 0;
    const start = performance.now();
    if (task.mode === "getblob") {
      const { stream } = await proxy.getBlob(img, task.digest!, task.size!);
      bytes = await consume(stream);
    } else if (task.mode === "rawblob") {
      const { stream } = await proxy.getRawBlob(img, task.digest!);
      bytes = await consume(stream);
    } else if (task.mode === "concurrent") {
      // All streams open at once (FinishPipe goes out only once a blob's bytes are in), read together.
      const streams = [];
      for (const blob of task.blobs!) streams.push((await proxy.getBlob(img, blob.digest, blob.size)).stream);
      bytes = (await Promise.all(streams.map(consume))).reduce((a, b) => a + b, 0);
    } else if (task.mode === "sequential") {
      for (const blob of task.blobs!) {
        bytes += await consume((await proxy.getBlob(img, blob.digest, blob.size)).stream);
      }
    } else if (task.mode === "fetch") {
      bytes = await fetchToLayout(proxy, img, task.output!);
    }
    const seconds = (performance.now() - start) / 1e3;
    const peak = status();
    if (task.size !== undefined && bytes !== task.size) {
      throw new Error(`Read ${bytes} of ${task.size} bytes`);
    }
    return {
      bytes,
      seconds,
      gibps: bytes / seconds / 2 ** 30,
      idleRssKiB: idle.rssKiB,
      idleHwmKiB: idle.hwmKiB,
      peakHwmKiB: peak.hwmKiB,
      peakMinusIdleMiB: (peak.hwmKiB - idle.rssKiB) / 1024,
    };
  } finally {
    await proxy.shutdown();
  }
}

/** Writes the image (manifest, config, every layer at once) as an OCI layout under `dir`. */
async function fetchToLayout(proxy: ImageProxy, img: OpenedImage, dir: string): Promise<number> {
  const { digest, raw } = await proxy.fetchManifestRaw(img);
  const manifest = JSON.parse(new TextDecoder().decode(raw));
  const blobs = join(dir, "blobs", "sha256");
  mkdirSync(blobs, { recursive: true });
  writeFileSync(join(blobs, digest.slice(7)), raw);
  const descriptors: { digest: string; size: number }[] = [manifest.config, ...manifest.layers];
  const streams = [];
  for (const d of descriptors) {
    streams.push({ d, stream: (await proxy.getBlob(img, d.digest, d.size)).stream });
  }
  const sizes = await Promise.all(streams.map(async ({ d, stream }) => {
    const file = await open(join(blobs, d.digest.slice(7)), "w");
    try {
      let n = 0;
      for await (const chunk of stream) {
        let off = 0;
        while (off < chunk.length) off += (await file.write(chunk, off, chunk.length - off)).bytesWritten;
        n += chunk.length;
      }
      await file.sync(); // as skopeo copy and src/image/layout.ts do before a blob counts as stored
      return n;
    } finally {
      await file.close();
    }
  }));
  writeFileSync(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    join(dir, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: manifest.mediaType, digest, size: raw.length }],
    }),
  );
  return sizes.reduce((a, b) => a + b, 0);
}

// Node before 24 has no import.meta.main: the CLI's test for the entry module covers it.
if (isEntryModule(import.meta)) {
  const task = JSON.parse(process.argv[process.argv.length - 1]) as ClientTask;
  try {
    const result = await run(task);
    process.stdout.write(JSON.stringify({ ok: true, ...result }) + "\n");
  } catch (err) {
    process.stdout.write(JSON.stringify({ ok: false, error: String((err as Error)?.stack ?? err) }) + "\n");
    process.exitCode = 1;
  }
  // Exit at once: under Deno a settled shutdown() still leaves its 2 s grace timer armed, which
  // would add 2 s to every run's wall time (see bench/README.md).
  process.exit();
}
