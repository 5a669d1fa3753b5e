import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { applyLayer, LayerError, LayerLimitError } from "../src/image/extract.ts";
import { exportImage, listImage, readFile } from "../src/image/inspect.ts";
import { readTar } from "../src/image/tar.ts";
import { readAll, SERVERS } from "./helpers/env.ts";
import {
  concatBytes,
  layer,
  padded,
  paxRecord,
  rawHeader,
  requireTool,
  streamOf,
  tempDir,
  writeOciLayout,
} from "./helpers/cli-helpers.ts";
import { withProxy } from "./helpers/proxy.ts";

const END = new Uint8Array(1024);
const MiB = 1 << 20;

/**
 * A PAX sparse file (format 1.0) as GNU tar writes it: the PAX records, a header holding the map and
 * the data, the map's numbers one a line padded to a block, then the segments' data.
 */
function sparseEntry(
  name: string,
  realSize: number,
  segments: [number, number][],
  options: { data?: Uint8Array; map?: string; major?: string; extra?: string } = {},
): Uint8Array {
  const map = options.map ?? [segments.length, ...segments.flat()].map((n) => `${n}\n`).join("");
  const data = options.data ??
    concatBytes(...segments.map(([offset, length]) => new Uint8Array(length).fill(offset % 251 + 1)));
  const stored = concatBytes(padded(map), data);
  const pax = new TextEncoder().encode(
    paxRecord("GNU.sparse.major", options.major ?? "1") + paxRecord("GNU.sparse.minor", "0") +
      paxRecord("GNU.sparse.name", name) + paxRecord("GNU.sparse.realsize", String(realSize)) +
      (options.extra ?? ""),
  );
  return concatBytes(
    rawHeader({ name: "./PaxHeaders/x", type: "x", size: pax.length }),
    padded(pax),
    rawHeader({ name: "./GNUSparseFile.0/x", type: "0", size: stored.length }),
    padded(stored),
  );
}

/** The content `sparseEntry` stores, expanded: each segment filled with its byte, zeros elsewhere. */
function expanded(realSize: number, segments: [number, number][]): Uint8Array {
  const out = new Uint8Array(realSize);
  for (const [offset, length] of segments) out.fill(offset % 251 + 1, offset, offset + length);
  return out;
}

async function readAllEntries(archive: Uint8Array, chunk = 7) {
  const seen = [];
  for await (const entry of readTar(streamOf(archive, chunk))) {
    const parts: Uint8Array[] = [];
    for await (const c of entry.content()) parts.push(c.slice());
    seen.push({ header: entry.header, content: concatBytes(...parts) });
  }
  return seen;
}

/** A file of `size` bytes with data at the start, in the middle and at the end, the rest holes. */
function makeHoles(path: string, size: number): void {
  execFileSync("sh", [
    "-c",
    `truncate -s ${size} "$1" && printf head | dd of="$1" conv=notrunc status=none &&
     printf middle | dd of="$1" bs=1 seek=${size / 2} conv=notrunc status=none &&
     printf tail | dd of="$1" bs=1 seek=${size - 4} conv=notrunc status=none`,
    "sh",
    path,
  ]);
}

/** GNU tar's PAX sparse archive of one file `sparse/holes` of `size` bytes, or a reason to skip. */
function gnuSparseLayer(size: number): { tar: Uint8Array; original: string } | string {
  const missing = requireTool("tar");
  if (missing) return missing;
  const dir = tempDir("sparse");
  mkdirSync(join(dir, "tree", "sparse"), { recursive: true });
  const original = join(dir, "tree", "sparse", "holes");
  makeHoles(original, size);
  execFileSync("ln", [original, join(dir, "tree", "sparse", "link")]);
  execFileSync("tar", [
    "--create",
    "--file",
    join(dir, "layer.tar"),
    "--directory",
    join(dir, "tree"),
    "--format=pax",
    "--sparse",
    "--sort=name",
    "--numeric-owner",
    ".",
  ]);
  const tar = new Uint8Array(readFileSync(join(dir, "layer.tar")));
  if (!new TextDecoder().decode(tar).includes("GNU.sparse.major=1")) {
    return "this GNU tar does not write PAX sparse format 1.0";
  }
  return { tar, original };
}

test("readTar reads GNU tar's PAX sparse file: its real name and size, its map, its content with zeros for holes", async (t) => {
  const built = gnuSparseLayer(4 * MiB);
  if (typeof built === "string") return t.skip(built);
  const files = (await readAllEntries(built.tar, 1000)).filter((e) => e.header.type === "file");
  assert.equal(files.length, 1);
  const [{ header, content }] = files;
  assert.equal(header.name, "./sparse/holes");
  assert.equal(header.size, 4 * MiB);
  assert.ok(header.sparse !== undefined && header.sparse.length >= 3, "the map lists the three data runs");
  assert.deepEqual(content, new Uint8Array(readFileSync(built.original)));
});

test("readTar parses a sparse map longer than a block and hands out each segment at its offset", async () => {
  // 100 segments: the map takes 2 blocks; segments adjacent and apart, one of length 0 at the end.
  const segments: [number, number][] = [];
  for (let i = 0; i < 99; i++) segments.push([i * 5000 + (i % 2) * 1000, 1000 + (i % 3)]);
  segments.push([600_000, 0]);
  const archive = concatBytes(sparseEntry("dir/file", 600_000, segments), END);
  const [entry] = await readAllEntries(archive);
  assert.equal(entry.header.name, "dir/file");
  assert.equal(entry.header.size, 600_000);
  assert.deepEqual(entry.header.sparse, segments.map(([offset, length]) => ({ offset, length })));
  assert.deepEqual(entry.content, expanded(600_000, segments));

  const pieces: string[] = [];
  for await (const e of readTar(streamOf(archive, 300))) {
    let at = -1;
    for await (const { offset, data } of e.segments()) {
      // Pieces of one segment follow each other; a new segment starts at its offset.
      if (offset !== at) pieces.push(`${offset}`);
      at = offset + data.length;
      assert.ok(
        data.every((b) => b === (segments.find(([o, l]) => offset >= o && offset < o + l)![0] % 251 + 1)),
      );
    }
  }
  assert.deepEqual(pieces, segments.filter(([, l]) => l > 0).map(([o]) => `${o}`));
});

test("applyLayer restores a PAX sparse file with its holes and its size, a hole at its end included", async () => {
  const segments: [number, number][] = [[0, 4096], [4 * MiB, 4096]];
  const dir = tempDir("sparse");
  const stats = await applyLayer(streamOf(concatBytes(sparseEntry("holes", 16 * MiB, segments), END)), dir);
  const path = join(dir, "holes");
  const info = statSync(path);
  assert.equal(info.size, 16 * MiB);
  assert.ok(info.blocks * 512 < 1 * MiB, `only the data takes blocks, not ${info.blocks * 512} bytes`);
  assert.deepEqual(new Uint8Array(readFileSync(path)), expanded(16 * MiB, segments));
  assert.equal(stats.bytes, 8192);
});

/** Asserts that applying `archive` fails with a LayerError whose message matches `message`. */
async function assertRefused(
  archive: Uint8Array,
  message: RegExp,
  type: abstract new (...args: never[]) => Error = LayerError,
): Promise<void> {
  await assert.rejects(applyLayer(streamOf(concatBytes(archive, END), 4096), tempDir("sparse")), (err) => {
    assert.ok(err instanceof type, `expected ${type.name}, got ${err}`);
    assert.match((err as Error).message, message);
    return true;
  });
}

test("hostile sparse maps are refused with a LayerError: overlapping, out of order, past the size, data mismatch", async () => {
  await assertRefused(sparseEntry("a", 100, [[0, 10], [5, 10]]), /sparse map of "a".*overlaps/);
  await assertRefused(sparseEntry("b", 100, [[50, 10], [0, 10]]), /sparse map of "b".*out of order/);
  await assertRefused(sparseEntry("c", 100, [[95, 10]]), /sparse map of "c".*past the file's size 100/);
  await assertRefused(
    sparseEntry("d", 100, [[0, 10]], { data: new Uint8Array(20) }),
    /sparse map of "d".*hold 10 bytes, the archive 20/,
  );
  await assertRefused(
    sparseEntry("e", 100, [], { map: "1\nx\n" }),
    /sparse map of "e".*not a list of numbers/,
  );
  await assertRefused(sparseEntry("f", 2 ** 53, [[0, 1]]), /realsize/);
  await assertRefused(
    sparseEntry("g", 100, [[0, 1]], { major: "0" }),
    /sparse format "0.0" is not supported/,
  );
  await assertRefused(
    sparseEntry("h", 100, [], { map: "1\n", extra: paxRecord("GNU.sparse.map", "0,1") }),
    /sparse/,
  );
  // The old GNU format: type "S".
  await assertRefused(concatBytes(rawHeader({ name: "s", type: "S", size: 0, magic: "gnu" })), /sparse/);
});

test("a sparse map claiming 2^40 segments is refused at 1 MiB of map, never allocated", async () => {
  // The stored size allows a map of 64 MiB; the map is refused at its limit, as the bytes arrive.
  const map = `${2 ** 40}\n` + "1\n".repeat(2 * MiB);
  const archive = sparseEntry("bomb", 2 ** 50, [], { map, data: new Uint8Array(0) });
  const before = process.memoryUsage().rss;
  await assertRefused(
    archive,
    /sparse map of "bomb" is too large \(limit "sparseMapBytes": 1048576\)/,
    LayerLimitError,
  );
  assert.ok(process.memoryUsage().rss - before < 256 * MiB, "memory stays bounded");
});

for (const server of SERVERS) {
  test(`readFile returns a sparse file's content with its holes as zeros, listImage its real size, exportImage a sparse file, from a hardlink too (${server.name})`, async (t) => {
    const built = gnuSparseLayer(2 * MiB);
    if (typeof built === "string") return t.skip(built);
    const dir = tempDir("sparse");
    writeOciLayout(join(dir, "layout"), [layer(built.tar, "gzip")]);
    const original = new Uint8Array(readFileSync(built.original));
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(`oci:${join(dir, "layout")}:latest`);
      assert.deepEqual(await readAll(await readFile(proxy, image, "/sparse/holes")), original);
      const listed = [];
      for await (const entry of listImage(proxy, image)) listed.push(entry);
      assert.equal(listed.find((e) => e.path === "sparse/holes")?.size, 2 * MiB);
      const exported = await readAll(exportImage(proxy, image));
      const files = (await readAllEntries(exported, 4096)).filter((e) => e.header.type === "file");
      assert.deepEqual(files.map((e) => [e.header.name, e.header.size]), [["sparse/holes", 2 * MiB]]);
      assert.deepEqual(files[0].content, original);
      assert.ok(files[0].header.sparse !== undefined, "the export keeps the file sparse");
      // GNU tar reads the export back to the same bytes, with the holes.
      const out = tempDir("sparse");
      execFileSync("tar", ["-x", "-C", out], { input: exported });
      assert.deepEqual(new Uint8Array(readFileSync(join(out, "sparse", "holes"))), original);
      assert.ok(statSync(join(out, "sparse", "holes")).blocks * 512 < MiB, "holes stay holes");
      await proxy.closeImage(image);

      // An upper layer replaces the file: its hardlink, kept aside while the layer is read, gets the bytes.
      const shadowed = join(dir, "shadowed");
      writeOciLayout(shadowed, [
        layer(built.tar, "gzip"),
        layer(
          concatBytes(rawHeader({ name: "sparse/holes", type: "0", size: 3 }), padded("new"), END),
          "none",
        ),
      ]);
      const upper = await proxy.openImage(`oci:${shadowed}:latest`);
      const out2 = tempDir("sparse");
      execFileSync("tar", ["-x", "-C", out2], { input: await readAll(exportImage(proxy, upper)) });
      assert.equal(readFileSync(join(out2, "sparse", "holes"), "utf8"), "new");
      assert.deepEqual(new Uint8Array(readFileSync(join(out2, "sparse", "link"))), original);
      assert.ok(statSync(join(out2, "sparse", "link")).blocks * 512 < MiB, "holes stay holes");
      await proxy.closeImage(upper);
    });
  });
}
