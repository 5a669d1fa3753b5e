// Many blobs at once on one proxy, cancellation, and faults: random interleavings driven by a seeded
// PRNG, reads in any order, shutdown and SIGKILL with streams open, the death of our own process, and
// a registry that stalls mid-blob. Every test runs against every skopeo in SERVERS and checks that no
// fd leaked and no child was left behind.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { BlobError, ImageProxy, type OpenedImage, ProxyClosedError, ProxyExitedError } from "../mod.ts";
import {
  assertNoLeakedFds,
  openFds,
  processAlive,
  readAll,
  readProcFile,
  ROOT,
  scriptCommand,
  type Server,
  SERVERS,
  waitFor,
  within,
} from "./helpers/env.ts";
import { noise, sha256, tagLatest, writeImage } from "./helpers/fixtures.ts";
import { withProxy } from "./helpers/proxy.ts";
import { childPids } from "./helpers/concurrency-procs.ts";
import { startStandInRegistry } from "./helpers/concurrency-registry.ts";

/** One blob of the fixture image, as the tests expect it. */
interface Blob {
  name: string;
  digest: string;
  size: number;
  data: Uint8Array;
}

/** An image with layers of varied sizes: one empty, tiny ones, and two larger than a 1 MiB pipe. */
function buildImage(): { dir: string; ref: string; manifestDigest: string; blobs: Blob[] } {
  const dir = mkdtempSync(join(tmpdir(), "cip-concurrency-"));
  const layout = join(dir, "layout");
  const sizes = [40_000, 300_000, 1_200_000, 2_600_000, 9_000];
  const image = writeImage(layout, [
    [{ name: "tiny", content: "x" }],
    ...sizes.map((size, i) => [{ name: `data${i}.bin`, content: noise(size, 100 + i) }]),
  ]);
  // An empty layer: GetBlob of size 0 must work too.
  const empty = new Uint8Array();
  const emptyDigest = sha256(empty);
  writeFileSync(join(layout, "blobs", "sha256", emptyDigest.slice(7)), empty);
  const layers = [
    ...image.layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
    { mediaType: "application/vnd.oci.image.layer.v1.tar", digest: emptyDigest, size: 0 },
  ];
  const manifestBytes = new TextEncoder().encode(JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: image.config.mediaType, digest: image.config.digest, size: image.config.size },
    layers,
  }));
  const manifestDigest = sha256(manifestBytes);
  mkdirSync(join(layout, "blobs", "sha256"), { recursive: true });
  writeFileSync(join(layout, "blobs", "sha256", manifestDigest.slice(7)), manifestBytes);
  tagLatest(layout, manifestDigest, manifestBytes.length);
  const blobs: Blob[] = [
    ...image.layers.map((l, i) => ({ name: `layer${i}`, digest: l.digest, size: l.size, data: l.data })),
    { name: "empty", digest: emptyDigest, size: 0, data: empty },
    { name: "config", digest: image.config.digest, size: image.config.size, data: image.configBytes },
  ];
  return { dir, ref: `oci:${layout}:latest`, manifestDigest, blobs };
}

const fixture = buildImage();
let bigImage: ReturnType<typeof buildBigImage> | undefined;
after(() => rmSync(fixture.dir, { recursive: true, force: true }));
const blobNamed = (name: string) => fixture.blobs.find((b) => b.name === name)!;
/** Larger than the 1 MiB the library grows blob pipes to: skopeo cannot have written it all ahead. */
const BIG = blobNamed("layer4");
const LARGE = blobNamed("layer3");

function hexSha256(chunks: Uint8Array[]): string {
  const hash = createHash("sha256");
  for (const chunk of chunks) hash.update(chunk);
  return "sha256:" + hash.digest("hex");
}

async function readToEnd(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<number> {
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return received;
    received += value.length;
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** mulberry32: small, fast, and the same sequence in every runtime. */
function prng(seed: number): { next(): number; int(n: number): number; pick<T>(items: T[]): T } {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  return { next, int, pick: (items) => items[int(items.length)] };
}

/** One stream of the property test and what the test knows about it. */
interface Tracked {
  id: number;
  blob: Blob;
  kind: "GetBlob" | "GetRawBlob";
  reader: ReadableStreamDefaultReader<Uint8Array>;
  abort: AbortController;
  chunks: Uint8Array[];
  received: number;
  state: "open" | "done" | "cancelled" | "aborted";
  reason?: Error;
}

const SEEDS = [0x5eed0001, 0xc0ffee, 20240611];
const STEPS = 150;
const MAX_OPEN = 8;

/** One 16 MiB layer: far more than the 1 MiB pipe, so that buffering on our side would show. */
function buildBigImage(): { ref: string; digest: string; size: number; data: Uint8Array } {
  const layout = join(fixture.dir, "big");
  const image = writeImage(layout, [[{ name: "big.bin", content: noise(16 << 20, 77) }]]);
  tagLatest(layout, image.manifest.digest, image.manifest.size);
  const [layer] = image.layers;
  return { ref: `oci:${layout}:latest`, digest: layer.digest, size: layer.size, data: layer.data };
}

/** Bytes process `pid` has written (pipes and sockets included). */
function bytesWritten(pid: number): number {
  return Number(/^wchar: (\d+)$/m.exec(readProcFile(`/proc/${pid}/io`))![1]);
}

for (const server of SERVERS) {
  const at = `(${server.name})`;
  const modern = server.protocol === "0.2.8";

  for (const seed of SEEDS) {
    test(`random interleavings of opens, reads, cancels, aborts, reopens and manifests deliver every byte, seed ${seed} ${at}`, async () => {
      const random = prng(seed);
      const log: string[] = [];
      const streams: Tracked[] = [];
      await withProxy(server, async (proxy) => {
        const images: OpenedImage[] = [
          await proxy.openImage(fixture.ref),
          await proxy.openImage(fixture.ref),
        ];
        const open = () => streams.filter((s) => s.state === "open");
        /** Streams with bytes still due: cancelling or aborting them has a defined outcome. */
        const unfinished = () => open().filter((s) => s.received < s.blob.size);

        const finishRead = (s: Tracked) => {
          s.state = "done";
          assert.equal(s.received, s.blob.size, `stream ${s.id} (${s.blob.name}, ${s.kind}) length`);
          assert.equal(
            hexSha256(s.chunks),
            s.blob.digest,
            `stream ${s.id} (${s.blob.name}, ${s.kind}) bytes`,
          );
        };
        const read = async (s: Tracked, chunks: number) => {
          for (let i = 0; i < chunks; i++) {
            const { done, value } = await within(s.reader.read(), 10_000, `reading stream ${s.id}`);
            if (done) return finishRead(s);
            s.chunks.push(value);
            s.received += value.length;
          }
        };

        const step = async () => {
          const roll = random.next();
          if (roll < 0.25 || open().length === 0) {
            if (open().length >= MAX_OPEN) return await step();
            const blob = random.pick(fixture.blobs);
            const raw = modern && random.next() < 0.3;
            const image = random.pick(images);
            const abort = new AbortController();
            const { size, stream } = raw
              ? await proxy.getRawBlob(image, blob.digest, { signal: abort.signal })
              : await proxy.getBlob(image, blob.digest, blob.size, { signal: abort.signal });
            assert.equal(size, blob.size);
            const s: Tracked = {
              id: streams.length,
              blob,
              kind: raw ? "GetRawBlob" : "GetBlob",
              reader: stream.getReader(),
              abort,
              chunks: [],
              received: 0,
              state: "open",
            };
            streams.push(s);
            log.push(`open ${s.id}:${blob.name}:${s.kind}`);
          } else if (roll < 0.6) {
            const s = random.pick(open());
            const chunks = 1 + random.int(4);
            log.push(`read ${s.id} x${chunks}`);
            await read(s, chunks);
          } else if (roll < 0.7) {
            const candidates = unfinished();
            if (candidates.length === 0) return;
            const s = random.pick(candidates);
            log.push(`cancel ${s.id}`);
            await within(s.reader.cancel(), 5000, `cancelling stream ${s.id}`);
            s.state = "cancelled";
            assert.deepEqual(await s.reader.read(), { done: true, value: undefined });
          } else if (roll < 0.8) {
            const candidates = unfinished();
            if (candidates.length === 0) return;
            const s = random.pick(candidates);
            log.push(`abort ${s.id}`);
            s.reason = new Error(`aborted stream ${s.id}`);
            s.abort.abort(s.reason);
            s.state = "aborted";
            await assert.rejects(s.reader.read(), (err) => err === s.reason);
          } else if (roll < 0.9) {
            const i = random.int(images.length);
            log.push(`manifest of image ${i}`);
            const { digest } = await within(proxy.fetchManifest(images[i]), 10_000, "fetchManifest");
            assert.equal(digest, fixture.manifestDigest);
          } else {
            // Streams of a closed image keep flowing: the server's copy owns its blob reader.
            const i = random.int(images.length);
            log.push(`reopen image ${i}`);
            await within(proxy.closeImage(images[i]), 10_000, "closeImage");
            images[i] = await within(proxy.openImage(fixture.ref), 10_000, "openImage");
          }
        };

        try {
          for (let i = 0; i < STEPS; i++) await step();
          log.push("drain");
          for (const s of open()) await read(s, Number.MAX_SAFE_INTEGER);
          for (const s of streams) {
            if (s.state === "cancelled") {
              assert.deepEqual(await s.reader.read(), { done: true, value: undefined });
            } else if (s.state === "aborted") {
              await assert.rejects(s.reader.read(), (err) => err === s.reason);
            } else {
              assert.equal(s.state, "done");
            }
          }
          // The proxy still answers, with every stream settled.
          const { digest } = await within(proxy.fetchManifest(images[0]), 10_000, "final fetchManifest");
          assert.equal(digest, fixture.manifestDigest);
          const check = await proxy.getBlob(images[1], LARGE.digest, LARGE.size);
          assert.equal(sha256(await within(readAll(check.stream), 10_000, "final getBlob")), LARGE.digest);
        } catch (err) {
          const summary = streams.map((s) => `${s.id}:${s.blob.name}:${s.kind}:${s.state}:${s.received}`);
          throw new Error(
            `seed ${seed} failed: ${(err as Error).message}\nlast actions: ${log.slice(-20).join(", ")}\n` +
              `streams: ${summary.join(" ")}`,
            { cause: err },
          );
        }
        const kinds = new Set(streams.map((s) => s.state));
        assert.ok(streams.length >= 5, `seed ${seed} opened only ${streams.length} streams`);
        assert.ok(kinds.has("done"), `seed ${seed} finished no stream`);
      });
    });
  }

  test(`a blob stream that is not read holds skopeo back: its pipe fills and nothing piles up here ${at}`, async () => {
    const big = bigImage ??= buildBigImage();
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(big.ref);
      const fetches: [string, () => ReturnType<typeof proxy.getBlob>][] = [
        ["getBlob", () => proxy.getBlob(img, big.digest, big.size)],
      ];
      if (modern) fetches.push(["getRawBlob", () => proxy.getRawBlob(img, big.digest)]);
      for (const [method, fetch] of fetches) {
        const start = bytesWritten(proxy.pid!);
        const { stream } = await fetch();
        const reader = stream.getReader();
        const first = await reader.read();
        assert.ok(!first.done && first.value.length > 0);
        // Let skopeo write all it can while nobody reads: until its count stops moving for 300 ms.
        let last = -1;
        for (let now = bytesWritten(proxy.pid!); now !== last; now = bytesWritten(proxy.pid!)) {
          last = now;
          await new Promise((r) => setTimeout(r, 300));
        }
        const ahead = last - start - first.value.length;
        assert.ok(
          ahead < 4 << 20,
          `${method}: skopeo wrote ${ahead} bytes past what was read, more than the 1 MiB pipe and a few chunks`,
        );
        const hash = createHash("sha256").update(first.value);
        let total = first.value.length;
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          hash.update(value);
          total += value.length;
        }
        assert.equal(total, big.size);
        assert.equal(`sha256:${hash.digest("hex")}`, big.digest, `${method}: every byte, in order`);
      }
    });
  });

  test(`streams read in reverse order of request, one left idle past the idle timeout and finished last ${at}`, async () => {
    const idleTimeoutMs = 500;
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(fixture.ref);
      const order = ["layer1", "layer4", "empty", "layer2", "layer3", "config", "layer0"].map(blobNamed);
      const streams = [];
      for (const [i, blob] of order.entries()) {
        const { stream } = modern && i % 3 === 1
          ? await proxy.getRawBlob(img, blob.digest)
          : await proxy.getBlob(img, blob.digest, blob.size);
        streams.push({ blob, reader: stream.getReader(), chunks: [] as Uint8Array[] });
      }
      // The big one is started, then left alone while every other stream finishes.
      const idle = streams[1];
      const first = await idle.reader.read();
      assert.ok(!first.done && first.value.length < idle.blob.size);
      idle.chunks.push(first.value);
      for (const s of [...streams].reverse()) {
        if (s === idle) continue;
        for (;;) {
          const { done, value } = await within(s.reader.read(), 10_000, `reading ${s.blob.name}`);
          if (done) break;
          s.chunks.push(value);
        }
        assert.equal(hexSha256(s.chunks), s.blob.digest, s.blob.name);
      }
      const { digest } = await within(proxy.fetchManifest(img), 10_000, "fetchManifest");
      assert.equal(digest, fixture.manifestDigest);
      // The idle timeout counts only while a read waits: an unread stream must survive it.
      await delay(idleTimeoutMs * 3);
      for (;;) {
        const { done, value } = await within(idle.reader.read(), 10_000, "reading the idle stream");
        if (done) break;
        idle.chunks.push(value);
      }
      assert.equal(hexSha256(idle.chunks), idle.blob.digest, "the idle stream, finished last");
    }, { blobIdleTimeoutMs: idleTimeoutMs });
  });

  test(`shutdown with streams open errors each of them with ProxyClosedError promptly ${at}`, async () => {
    const before = openFds();
    const children = childPids();
    const proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const img = await proxy.openImage(fixture.ref);
    const readers = [];
    // Untouched and partly read streams; a chunk is at most the 1 MiB pipe, so none can be finished.
    const plan: [Blob, number][] = [[BIG, 0], [LARGE, 1], [BIG, 2], [BIG, 1]];
    for (const [i, [blob, chunks]] of plan.entries()) {
      const { stream } = modern && i === 2
        ? await proxy.getRawBlob(img, blob.digest)
        : await proxy.getBlob(img, blob.digest, blob.size);
      const reader = stream.getReader();
      let received = 0;
      for (let n = 0; n < chunks; n++) received += (await reader.read()).value?.length ?? 0;
      assert.ok(received < blob.size, `stream ${i} has bytes still due`);
      readers.push(reader);
    }
    const started = Date.now();
    const shutdown = proxy.shutdown();
    for (const [i, reader] of readers.entries()) {
      await assert.rejects(within(readToEnd(reader), 2000, `stream ${i} to error`), (err: unknown) => {
        assert.ok(err instanceof ProxyClosedError, `stream ${i}: ${err}`);
        return true;
      });
    }
    const errored = Date.now() - started;
    assert.ok(errored < 1000, `streams errored ${errored} ms after shutdown()`);
    await within(shutdown, 5000, "shutdown()");
    await waitFor(() => !processAlive(proxy.pid!), 5000, "skopeo to exit");
    await assert.rejects(proxy.fetchManifest(img), ProxyClosedError);
    await assertNoLeakedFds(before);
    assert.deepEqual(childPids(), children);
  });

  test(`skopeo killed with SIGKILL while several streams are open errors every one with ProxyExitedError ${at}`, async () => {
    const before = openFds();
    const children = childPids();
    const proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const img = await proxy.openImage(fixture.ref);
    const readers = [];
    // Each has bytes still due, so none can have been confirmed before the kill.
    for (const [i, blob] of [BIG, blobNamed("layer1"), LARGE, BIG, blobNamed("layer0")].entries()) {
      const { stream } = modern && i === 3
        ? await proxy.getRawBlob(img, blob.digest)
        : await proxy.getBlob(img, blob.digest, blob.size);
      const reader = stream.getReader();
      if (i % 2 === 0 && blob.size > 1 << 20) await reader.read();
      readers.push(reader);
    }
    process.kill(proxy.pid!, "SIGKILL");
    for (const [i, reader] of readers.entries()) {
      await assert.rejects(within(readToEnd(reader), 5000, `stream ${i} to error`), (err: unknown) => {
        assert.ok(err instanceof ProxyExitedError, `stream ${i}: ${err}`);
        assert.equal(err.status.signal, "SIGKILL");
        return true;
      });
    }
    await assert.rejects(proxy.fetchManifest(img), ProxyExitedError);
    await assert.rejects(proxy.shutdown(), /signal SIGKILL/);
    await assertNoLeakedFds(before);
    assert.deepEqual(childPids(), children);
  });

  test(`a registry that stalls mid-blob errors the stream with a retryable BlobError and the proxy still serves ${at}`, async () => {
    const registry = await startStandInRegistry();
    const before = openFds();
    const children = childPids();
    const idleTimeoutMs = 500;
    let proxy: ImageProxy | undefined;
    try {
      proxy = await ImageProxy.spawn({
        skopeoCmd: server.skopeoCmd,
        insecureSkipTlsVerification: true,
        blobIdleTimeoutMs: idleTimeoutMs,
      });
      const img = await proxy.openImage(registry.ref("stall"));
      assert.equal((await proxy.fetchManifest(img)).digest, registry.manifestDigest);
      const { layer } = registry;
      const fetches = [() => proxy!.getBlob(img, layer.digest, layer.size)];
      if (modern) fetches.push(() => proxy!.getRawBlob(img, layer.digest));
      for (const [i, fetch] of fetches.entries()) {
        const method = i === 0 ? "getBlob" : "getRawBlob";
        const { stream } = await fetch();
        const reader = stream.getReader();
        let received = 0;
        const started = Date.now();
        await assert.rejects(
          within(
            (async () => {
              for (;;) {
                const { done, value } = await reader.read();
                if (done) break;
                received += value.length;
              }
            })(),
            10_000,
            `${method} to give up on the stalled blob`,
          ),
          (err: unknown) => {
            assert.ok(err instanceof BlobError, `${method}: ${err}`);
            assert.equal(err.retryable, true, `${method}: ${err.message}`);
            assert.equal(err.digest, layer.digest);
            assert.match(err.message, /stalled/);
            return true;
          },
        );
        assert.equal(received, registry.stalledAfter, `${method} passed on every byte the registry sent`);
        assert.ok(Date.now() - started >= idleTimeoutMs);
        // The proxy is not held by the stalled copy.
        const again: { digest: string } = await within(
          proxy.fetchManifest(img),
          10_000,
          `fetchManifest after ${method}`,
        );
        assert.equal(again.digest, registry.manifestDigest);
        const config = await proxy.getBlob(img, registry.config.digest, registry.config.size);
        assert.deepEqual(
          await within(readAll(config.stream), 10_000, "the config blob"),
          registry.config.data,
        );
      }
      assert.equal(registry.held(), fetches.length, "each stalled response is still held open");
    } finally {
      await proxy?.shutdown();
      await registry.close();
    }
    await waitFor(() => !processAlive(proxy!.pid!), 5000, "skopeo to exit");
    await assertNoLeakedFds(before);
    assert.deepEqual(childPids(), children);
  });

  // A stream given up by its reader while the registry stalls: the server's copy is blocked reading the
  // registry, so a FinishPipe for that pipe would hold the server (and every later request) until the
  // registry sends again, which a stalled one never does.
  for (const how of ["aborting through its signal", "cancelling"] as const) {
    test(`${how} a blob stream whose registry stalled leaves the proxy usable ${at}`, async () => {
      const registry = await startStandInRegistry();
      const before = openFds();
      const children = childPids();
      // The default idle timeout (120 s) is far away: the reader gives up first.
      const proxy = await ImageProxy.spawn({
        skopeoCmd: server.skopeoCmd,
        insecureSkipTlsVerification: true,
      });
      let later: Promise<{ digest: string }> | undefined;
      try {
        const img = await proxy.openImage(registry.ref("stall"));
        const { layer } = registry;
        let abort = new AbortController();
        const fetches = [() => proxy.getBlob(img, layer.digest, layer.size, { signal: abort.signal })];
        if (modern) fetches.push(() => proxy.getRawBlob(img, layer.digest, { signal: abort.signal }));
        for (const [i, fetch] of fetches.entries()) {
          const method = i === 0 ? "getBlob" : "getRawBlob";
          abort = new AbortController();
          const { stream } = await fetch();
          const reader = stream.getReader();
          let received = 0;
          while (received < registry.stalledAfter) {
            const { done, value } = await within(
              reader.read(),
              10_000,
              `the first half of the ${method} blob`,
            );
            assert.ok(!done);
            received += value.length;
          }
          const waiting = reader.read(); // stays pending: the registry sends nothing more
          if (how === "cancelling") {
            await within(reader.cancel(), 2000, "cancel()");
            assert.deepEqual(await waiting, { done: true, value: undefined });
          } else {
            const reason = new Error("the reader gave up");
            abort.abort(reason);
            await assert.rejects(waiting, (err) => err === reason);
          }
          later = proxy.fetchManifest(img);
          const { digest } = await within(
            later,
            3000,
            `fetchManifest after ${how} the stalled ${method} stream`,
          );
          assert.equal(digest, registry.manifestDigest);
        }
      } finally {
        later?.catch(() => {});
        await proxy.shutdown().catch(() => {});
        await registry.close();
      }
      await waitFor(() => !processAlive(proxy.pid!), 5000, "skopeo to exit");
      await assertNoLeakedFds(before);
      assert.deepEqual(childPids(), children);
    });
  }

  test(`skopeo stuck inside a request dies with its parent runtime process killed by SIGKILL ${at}`, async () => {
    const registry = await startStandInRegistry();
    const children = childPids();
    const child = startChild(server, { ref: registry.ref("hang"), mode: "hang" });
    try {
      const { pid } = await within(child.next(), 20_000, "the child to start skopeo") as { pid: number };
      assert.ok(processAlive(pid));
      // skopeo is now blocked in OpenImage: it will not see its socket close, only the signal helps.
      await waitFor(() => registry.held() > 0, 20_000, "skopeo to ask for the hanging manifest");
      process.kill(child.pid, "SIGKILL");
      await within(child.exited, 5000, "the parent to die");
      await waitFor(() => !processAlive(pid), 5000, `skopeo ${pid} to die with its parent`);
    } finally {
      child.kill();
      await within(child.exited, 5000, "the parent to be reaped");
      await registry.close();
    }
    assert.deepEqual(childPids(), children);
  });
}

/** A child runtime process running tests/helpers/concurrency-child.ts, read line by line. */
function startChild(server: Server, options: { ref: string; mode: "hang" | "idle" | "leave" }) {
  const script = join(ROOT, "tests", "helpers", "concurrency-child.ts");
  const argument = JSON.stringify({
    // The system skopeo is what the default prefix starts: leave it to the default.
    binary: server.binary[0] === "skopeo" ? undefined : server.binary,
    ...options,
  });
  const [command, ...args] = scriptCommand(script, [
    "--allow-ffi",
    "--allow-run",
    "--allow-env",
    "--allow-read",
    "--allow-write",
  ]);
  const proc = spawn(command, [...args, argument], { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  proc.stderr!.on("data", (chunk) => stderr += chunk);
  const lines = createInterface({ input: proc.stdout! })[Symbol.asyncIterator]();
  return {
    pid: proc.pid!,
    async next(): Promise<Record<string, unknown>> {
      const { done, value } = await lines.next();
      if (done) throw new Error(`The child ended without answering: ${stderr}`);
      return JSON.parse(value);
    },
    send(line: string) {
      proc.stdin!.write(line + "\n");
    },
    exited: new Promise<number | null>((resolve) => proc.once("exit", (code) => resolve(code))),
    kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      proc.stdin!.destroy();
    },
  };
}

test(
  `an idle proxy in a long-lived parent survives well past any thread-pool idle timeout (${
    SERVERS.map((s) => s.name).join(", ")
  })`,
  async () => {
    const idleMs = 15_000;
    const children = SERVERS.map((server) => ({
      server,
      child: startChild(server, { ref: fixture.ref, mode: "idle" }),
    }));
    try {
      const pids: number[] = [];
      for (const { server, child } of children) {
        const { pid } = await within(child.next(), 20_000, `the child for ${server.name} to start`) as {
          pid: number;
        };
        pids.push(pid);
      }
      // Idle on purpose: nothing touches the proxies while the runtimes' worker threads time out.
      await delay(idleMs);
      for (const [i, { server, child }] of children.entries()) {
        assert.ok(processAlive(pids[i]), `${server.name} died while idle`);
        child.send("manifest");
        const answer = await within(child.next(), 10_000, `${server.name} to answer after idling`);
        assert.deepEqual(answer, { digest: fixture.manifestDigest }, server.name);
        child.send("exit");
        assert.deepEqual(await within(child.next(), 10_000, "the child to shut down"), { exited: true });
        assert.equal(await child.exited, 0);
        await waitFor(() => !processAlive(pids[i]), 5000, `${server.name} to exit`);
      }
    } finally {
      for (const { child } of children) child.kill();
      for (const { child } of children) await within(child.exited, 5000, "the child to be reaped");
    }
  },
);

for (const server of SERVERS) {
  test(`a program that leaves its proxy idle ends by itself, and skopeo with it (${server.name})`, async () => {
    const child = startChild(server, { ref: fixture.ref, mode: "leave" });
    try {
      const { pid } = await within(child.next(), 20_000, "the child to start") as { pid: number };
      // Nothing of the proxy's (the child process, its stderr pipe, the socket) may hold the program.
      assert.equal(await within(child.exited, 10_000, "the program to end by itself"), 0);
      await waitFor(() => !processAlive(pid), 5000, `skopeo ${pid} to exit with its parent`);
    } finally {
      child.kill();
    }
  });
}
