import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, lstatSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { createGzip } from "node:zlib";
import { ImageProxy } from "../mod.ts";
import {
  applyLayer,
  DirectoryNotEmptyError,
  extractImage,
  LAYER_LIMITS,
  LayerError,
  LayerLimitError,
  WrittenPaths,
} from "../src/image/extract.ts";
import { decompress } from "../src/image/decompress.ts";
import { tar, type TarEntry } from "./helpers/fixtures.ts";
import { SERVERS } from "./helpers/env.ts";
import {
  concatBytes,
  gzip,
  layer,
  padded,
  paxRecord,
  rawHeader,
  requireTool,
  runCli,
  streamOf,
  tempDir,
  writeOciLayout,
  zstd,
} from "./helpers/cli-helpers.ts";

const END = new Uint8Array(1024);
const MiB = 1024 * 1024;
/** How much the process may grow while applying one hostile layer. */
const CEILING = 300 * MiB;

/** A PAX header (`x` or global `g`) carrying `records`. */
function paxHeader(type: "x" | "g", records: string): Uint8Array {
  const body = new TextEncoder().encode(records);
  return concatBytes(rawHeader({ name: "PaxHeader", type, size: body.length }), padded(body));
}

/** A stream that yields `first`, then `repeat` `count` times, then `last`, made as it is read. */
function generated(
  first: Uint8Array,
  repeat: Uint8Array,
  count: number,
  last = END,
): ReadableStream<Uint8Array> {
  let sent = -1;
  return new ReadableStream({
    pull(controller) {
      if (sent === -1) controller.enqueue(first);
      else if (sent < count) controller.enqueue(repeat);
      else if (sent === count) controller.enqueue(last);
      else controller.close();
      sent++;
    },
  });
}

/** `blocks` copies of `block`, concatenated. */
function repeated(block: Uint8Array, blocks: number): Uint8Array {
  const out = new Uint8Array(block.length * blocks);
  for (let i = 0; i < blocks; i++) out.set(block, i * block.length);
  return out;
}

/** Runs `work`, sampling the resident set size, and fails when it grew past `CEILING`. */
async function withinCeiling<T>(work: () => Promise<T>): Promise<T> {
  const base = process.memoryUsage().rss;
  let peak = base;
  const timer = setInterval(() => peak = Math.max(peak, process.memoryUsage().rss), 5);
  try {
    return await work();
  } finally {
    clearInterval(timer);
    peak = Math.max(peak, process.memoryUsage().rss);
    assert.ok(peak - base < CEILING, `memory grew by ${Math.round((peak - base) / MiB)} MiB`);
  }
}

async function assertLimit(work: Promise<unknown>, limit: string) {
  await assert.rejects(work, (err: unknown) => {
    assert.ok(err instanceof LayerLimitError, `expected LayerLimitError, got ${err}`);
    assert.equal(err.limit, limit);
    assert.match(err.message, new RegExp(`limit "${limit}"`));
    return true;
  });
}

test("a 1 KB layer whose PAX path has 100,000 components is refused, in bounded memory", async () => {
  const path = "a/".repeat(100_000) + "f";
  const archive = gzip(
    concatBytes(paxHeader("x", paxRecord("path", path)), rawHeader({ name: "f", type: "0" }), END),
  );
  assert.ok(archive.length < 2000, `layer is ${archive.length} bytes`);
  const started = Date.now();
  await withinCeiling(() => assertLimit(applyLayer(streamOf(archive), tempDir("hostile")), "pathBytes"));
  assert.ok(Date.now() - started < 10_000);
});

test("a path within 4096 bytes but over the component limit is refused", async () => {
  const archive = concatBytes(
    paxHeader("x", paxRecord("path", "a/".repeat(1500) + "f")),
    rawHeader({ name: "f", type: "0" }),
    END,
  );
  await assertLimit(applyLayer(streamOf(archive), tempDir("hostile")), "pathComponents");
});

test("5,000 entries of 1,000 path components each take time linear in their components", async () => {
  const path = "d/".repeat(999) + "d";
  const entry = concatBytes(paxHeader("x", paxRecord("path", path)), rawHeader({ name: "d", type: "5" }));
  const started = Date.now();
  const stats = await applyLayer(generated(new Uint8Array(0), repeated(entry, 100), 50), tempDir("deep"));
  assert.equal(stats.directories, 5_000);
  assert.ok(Date.now() - started < 15_000, `took ${Date.now() - started} ms`);
});

test("global PAX headers beyond 1 MiB in total are refused before they fill memory", async () => {
  let i = 0;
  const header = () => paxHeader("g", paxRecord(`comment${i++}`, "x".repeat(MiB - 64)));
  let sent = 0;
  const stream = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent++ < 1500) controller.enqueue(header());
      else controller.close();
    },
  });
  await withinCeiling(() => assertLimit(applyLayer(stream, tempDir("hostile")), "globalMetadataBytes"));
  assert.ok(sent < 10, `read ${sent} headers`);
});

test("a global PAX header with 40,000 keys costs nothing per entry", async () => {
  let records = "";
  for (let k = 0; k < 40_000; k++) records += paxRecord(`k${k}`, "v");
  const fifos = repeated(rawHeader({ name: "p", type: "6" }), 128);
  const started = Date.now();
  const stats = await applyLayer(
    generated(paxHeader("g", records), fifos, 1563),
    tempDir("hostile"),
  );
  assert.equal(stats.skippedCount, 1563 * 128);
  assert.ok(Date.now() - started < 30_000, `took ${Date.now() - started} ms`);
});

test("300,000 FIFO entries are counted, not listed, in bounded memory", async () => {
  const fifos = repeated(rawHeader({ name: "run/fifo", type: "6" }), 128);
  const count = 2344 * 128;
  const stats = await withinCeiling(() =>
    applyLayer(generated(new Uint8Array(0), fifos, count / 128), tempDir("hostile"))
  );
  assert.equal(stats.skippedCount, count);
  assert.equal(stats.skipped.length, 20);
  assert.equal(stats.skipped[0], "fifo run/fifo");
});

/** A tar of one FIFO entry carrying `size` zeros as data (read and skipped, never written), gzip'd. */
async function gzipBomb(size: number): Promise<Uint8Array> {
  const gz = createGzip({ level: 1 });
  const parts: Uint8Array[] = [];
  gz.on("data", (chunk: Uint8Array) => parts.push(new Uint8Array(chunk)));
  const done = new Promise((resolve) => gz.on("end", resolve));
  gz.write(rawHeader({ name: "bomb", type: "6", size }));
  const zeros = new Uint8Array(4 * MiB);
  for (let written = 0; written < size; written += zeros.length) {
    if (!gz.write(zeros)) await new Promise((resolve) => gz.once("drain", resolve));
  }
  gz.end(END);
  await done;
  return concatBytes(...parts);
}

/** A zstd frame (1 MiB window) of `blocks` RLE blocks of 128 KiB zeros each: 4 bytes per block. */
function zstdBomb(blocks: number): Uint8Array {
  const out = new Uint8Array(6 + blocks * 4);
  out.set([0x28, 0xb5, 0x2f, 0xfd, 0x00, 10 << 3]); // No checksum, no size; window 2^20.
  for (let i = 0; i < blocks; i++) {
    const header = ((128 * 1024) << 3) | (1 << 1) | (i === blocks - 1 ? 1 : 0);
    out.set([header & 0xff, (header >> 8) & 0xff, header >> 16, 0], 6 + i * 4);
  }
  return out;
}

test("gzip and zstd bombs decompress in bounded chunks and memory", async () => {
  const gz = await gzipBomb(1024 * MiB);
  const zst = zstdBomb(8192); // 1 GiB from 32 KiB.
  for (const bomb of [gz, zst]) {
    let largest = 0;
    let total = 0;
    await withinCeiling(async () => {
      const { stream } = await decompress(streamOf(bomb, 64 * 1024));
      for await (const chunk of stream) {
        largest = Math.max(largest, chunk.length);
        total += chunk.length;
      }
    });
    assert.ok(largest <= LAYER_LIMITS.chunkBytes, `a chunk of ${largest} bytes`);
    assert.ok(total >= 1024 * MiB);
  }
  const stats = await withinCeiling(() => applyLayer(streamOf(gz, 64 * 1024), tempDir("bomb")));
  assert.equal(stats.skippedCount, 1);
});

test("a zstd bomb is decoded in slices that let timers run in between", async () => {
  const bomb = zstdBomb(8192); // 1 GiB from 32 KiB.
  let last = performance.now();
  let gap = 0;
  const timer = setInterval(() => {
    gap = Math.max(gap, performance.now() - last);
    last = performance.now();
  }, 1);
  const start = performance.now();
  try {
    const { stream } = await decompress(streamOf(bomb, 64 * 1024));
    for await (const _ of stream) { /* only timers matter */ }
  } finally {
    clearInterval(timer);
  }
  gap = Math.max(gap, performance.now() - last);
  const took = performance.now() - start;
  // Decoding all of it on the JS thread in one go would hold the timer for nearly the whole time.
  assert.ok(gap < took / 2, `timers waited ${gap.toFixed(0)} ms of ${took.toFixed(0)} ms`);
});

test("a zstd layer stream cancelled before its first read cancels the layer's stream", async (t) => {
  const missing = requireTool("zstd");
  if (missing) return t.skip(missing);
  const frame = zstd(new Uint8Array(1 << 20));
  let cancelled = false;
  const layer = new ReadableStream<Uint8Array>({
    start: (controller) => controller.enqueue(frame),
    cancel: () => void (cancelled = true),
  });
  const { stream } = await decompress(layer);
  await stream.cancel();
  assert.ok(cancelled, "the layer's stream was left open");
});

const FILES: TarEntry[] = [
  { name: "a/", type: "dir" },
  { name: "a/one", content: "1".repeat(5000) },
  { name: "a/two", content: "2".repeat(7000) },
  { name: "b", content: "b" },
];

async function assertFiles(bytes: Uint8Array, chunk: number) {
  const dir = tempDir("frames");
  await applyLayer(streamOf(bytes, chunk), dir);
  assert.equal(readFileSync(join(dir, "a/one"), "utf8"), "1".repeat(5000));
  assert.equal(readFileSync(join(dir, "a/two"), "utf8"), "2".repeat(7000));
  assert.equal(readFileSync(join(dir, "b"), "utf8"), "b");
}

test("multi-frame zstd and multi-member gzip layers are read whole, in one chunk or many", async (t) => {
  const missing = requireTool("zstd");
  if (missing) return t.skip(missing);
  const raw = tar(FILES);
  const cut = 6000;
  const skippable = concatBytes(new Uint8Array([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0]), new Uint8Array(3));
  const frames = concatBytes(zstd(raw.slice(0, cut)), zstd(raw.slice(cut)), skippable);
  const members = concatBytes(gzip(raw.slice(0, cut)), gzip(raw.slice(cut)));
  for (const chunk of [1 << 20, 100]) {
    await assertFiles(frames, chunk);
    await assertFiles(members, chunk);
  }
});

test("corrupt, badly checksummed and truncated zstd layers fail with a LayerError", async (t) => {
  const missing = requireTool("zstd");
  if (missing) return t.skip(missing);
  const raw = tar([{ name: "big", content: new TextEncoder().encode("some text ".repeat(50_000)) }]);
  const good = zstd(raw);
  const checked = new Uint8Array(execFileSync("zstd", ["-q", "-c", "--check"], { input: raw }));
  const corrupt = checked.slice();
  corrupt.fill(0x55, 20, 60);
  const badChecksum = checked.slice();
  badChecksum[badChecksum.length - 1] ^= 0xff;
  for (
    const [what, bytes] of [["corrupt", corrupt], ["bad checksum", badChecksum], [
      "truncated",
      good.slice(0, -100),
    ]]
  ) {
    await assert.rejects(
      applyLayer(streamOf(bytes as Uint8Array, 4096), tempDir("zstd")),
      LayerError,
      what as string,
    );
  }
});

test("a zstd frame asking for a window over 128 MiB is refused before anything is allocated", async () => {
  const frame = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x00, 21 << 3, 0x01, 0x00, 0x00]); // 2^31 bytes.
  await assertLimit(applyLayer(streamOf(frame), tempDir("window")), "zstdWindowBytes");
});

test("as root, owners are kept by number; without them setuid and setgid bits are dropped", async () => {
  const archive = concatBytes(
    paxHeader("x", paxRecord("uid", "1000") + paxRecord("gid", "1000")),
    rawHeader({ name: "usr/local/bin/tool", type: "0", mode: 0o6755, size: 1 }),
    padded("x"),
    END,
  );
  const kept = tempDir("owner");
  await applyLayer(streamOf(archive), kept);
  const info = statSync(join(kept, "usr/local/bin/tool"));
  const root = statSync(tempDir("uid")).uid === 0; // Deno asks --allow-sys for process.getuid().
  if (root) {
    assert.equal(info.uid, 1000);
    assert.equal(info.mode & 0o7777, 0o6755);
  } else assert.equal(info.mode & 0o7777, 0o755);
  const dropped = tempDir("owner");
  await applyLayer(streamOf(archive), dropped, { sameOwner: false });
  const plain = statSync(join(dropped, "usr/local/bin/tool"));
  assert.equal(plain.uid, statSync(dropped).uid);
  assert.equal(plain.mode & 0o7777, 0o755);
});

test("whiteouts of an image never remove what the directory held before it", async () => {
  const dir = tempDir("precious");
  writeFileSync(join(dir, "PRECIOUS"), "mine");
  writeFileSync(join(dir, "OTHER"), "mine too");
  const writtenPaths = new WrittenPaths();
  await applyLayer(streamOf(tar([{ name: "mine", content: "layer 0" }])), dir, { writtenPaths });
  await applyLayer(
    streamOf(tar([{ name: ".wh.PRECIOUS", content: "" }, { name: ".wh..wh..opq", content: "" }])),
    dir,
    { writtenPaths },
  );
  assert.equal(readFileSync(join(dir, "PRECIOUS"), "utf8"), "mine");
  assert.equal(readFileSync(join(dir, "OTHER"), "utf8"), "mine too");
  assert.ok(!existsSync(join(dir, "mine")), "what the image's lower layer wrote is hidden");
});

test("an opaque marker reached through a symlink keeps what its own layer wrote", async () => {
  const dir = tempDir("alias");
  await applyLayer(
    streamOf(tar([
      { name: "real/", type: "dir" },
      { name: "real/x", content: "kept" },
      { name: "alias", type: "symlink", linkname: "real" },
      { name: "alias/.wh..wh..opq", content: "" },
    ])),
    dir,
  );
  assert.equal(readFileSync(join(dir, "real/x"), "utf8"), "kept");
  assert.ok(lstatSync(join(dir, "alias")).isSymbolicLink());
});

const server = SERVERS[0];
test(`extractImage refuses a non-empty directory unless asked to overwrite (${server.name})`, async () => {
  const layout = tempDir("precious-layout");
  writeOciLayout(layout, [
    layer(
      tar([{ name: ".wh.PRECIOUS", content: "" }, { name: ".wh..wh..opq", content: "" }, {
        name: "f",
        content: "1",
      }]),
      "gzip",
    ),
  ]);
  await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
  const image = await proxy.openImage(`oci:${layout}:latest`);
  const dir = tempDir("home");
  writeFileSync(join(dir, "PRECIOUS"), "mine");
  await assert.rejects(extractImage(proxy, image, dir), (err: unknown) => {
    assert.ok(err instanceof DirectoryNotEmptyError);
    assert.match(err.message, /not empty/);
    return true;
  });
  await extractImage(proxy, image, dir, { overwrite: true });
  assert.equal(readFileSync(join(dir, "PRECIOUS"), "utf8"), "mine");
  assert.equal(readFileSync(join(dir, "f"), "utf8"), "1");
});

test(`the CLI's extract refuses a non-empty DIR, and --overwrite keeps what it held (${server.name})`, () => {
  const layout = tempDir("cli-precious-layout");
  writeOciLayout(layout, [
    layer(tar([{ name: ".wh.PRECIOUS", content: "" }, { name: "f", content: "1" }]), "gzip"),
  ]);
  const dir = tempDir("cli-home");
  writeFileSync(join(dir, "PRECIOUS"), "mine");
  const args = ["--skopeo", server.skopeoCmd.join(" "), "extract", `oci:${layout}:latest`, dir];
  const refused = runCli(args);
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /^error: .*not empty/m);
  const done = runCli([...args, "--overwrite", "--no-same-owner"]);
  assert.equal(done.status, 0, done.stderr);
  assert.equal(readFileSync(join(dir, "PRECIOUS"), "utf8"), "mine");
  assert.equal(readFileSync(join(dir, "f"), "utf8"), "1");
});

test(`the CLI fails a corrupt zstd layer with one error line (${server.name})`, (t) => {
  const missing = requireTool("zstd");
  if (missing) return t.skip(missing);
  const raw = tar([{ name: "big", content: new TextEncoder().encode("some text ".repeat(50_000)) }]);
  const corrupt = new Uint8Array(execFileSync("zstd", ["-q", "-c", "--check"], { input: raw }));
  corrupt.fill(0x55, 20, 60);
  const layout = tempDir("cli-corrupt-layout");
  writeOciLayout(layout, [{
    blob: corrupt,
    mediaType: "application/vnd.oci.image.layer.v1.tar+zstd",
    tar: raw,
  }]);
  const result = runCli([
    "--skopeo",
    server.skopeoCmd.join(" "),
    "extract",
    `oci:${layout}:latest`,
    tempDir("cli-out"),
  ]);
  assert.equal(result.status, 1);
  assert.match(result.stderr, /^error: .*Cannot decompress the zstd layer: .*\n$/);
  assert.equal(result.stderr.trim().split("\n").length, 1, result.stderr);
});
