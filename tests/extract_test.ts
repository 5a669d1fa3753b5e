import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import {
  existsSync,
  lstatSync,
  mkdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { ImageProxy } from "../mod.ts";
import { applyLayer, extractImage, LayerError, UnsafeEntryError } from "../src/image/extract.ts";
import { readTar } from "../src/image/tar.ts";
import { buildFixtures, noise, tar, type TarEntry } from "./helpers/fixtures.ts";
import { SERVERS } from "./helpers/env.ts";
import {
  concatBytes,
  gzip,
  layer,
  padded,
  paxRecord,
  rawHeader,
  requireTool,
  streamOf,
  tempDir,
  writeOciLayout,
  zstd,
} from "./helpers/cli-helpers.ts";

const END = new Uint8Array(1024);

async function apply(entries: TarEntry[] | Uint8Array, dir: string, chunk = 700) {
  const bytes = entries instanceof Uint8Array ? entries : tar(entries);
  return await applyLayer(streamOf(bytes, chunk), dir);
}

/** Asserts that applying `entries` is refused with an UnsafeEntryError naming `entry`. */
async function assertRefused(entries: TarEntry[] | Uint8Array, dir: string, entry: string) {
  await assert.rejects(apply(entries, dir), (err: unknown) => {
    assert.ok(err instanceof UnsafeEntryError, `expected UnsafeEntryError, got ${err}`);
    assert.equal(err.entry, entry);
    assert.match(err.message, new RegExp(`"${entry.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}"`));
    return true;
  });
}

const ORDINARY: TarEntry[] = [
  { name: "etc/", type: "dir", mode: 0o755 },
  { name: "etc/hostname", content: "box\n", mode: 0o644 },
  { name: "bin/", type: "dir" },
  { name: "bin/tool", content: "#!/bin/sh\necho tool\n", mode: 0o755 },
  { name: "bin/setuid", content: "x", mode: 0o4711 },
  { name: "secret/", type: "dir", mode: 0o700 },
  { name: "secret/key", content: "k", mode: 0o600 },
  { name: "readonly/", type: "dir", mode: 0o555 },
  { name: "readonly/inside", content: "still written" },
  { name: "data/big.bin", content: noise(200_000, 3) },
  { name: "bin/link", type: "symlink", linkname: "tool" },
  { name: "bin/hard", type: "link", linkname: "bin/tool" },
];

test("applyLayer writes files, directories and their modes from an uncompressed tar", async () => {
  const dir = tempDir("extract");
  const stats = await apply(ORDINARY, dir);
  assert.equal(stats.compression, "none");
  assert.equal(readFileSync(join(dir, "etc/hostname"), "utf8"), "box\n");
  assert.deepEqual(new Uint8Array(readFileSync(join(dir, "data/big.bin"))), noise(200_000, 3));
  assert.equal(statSync(join(dir, "bin/tool")).mode & 0o7777, 0o755);
  assert.equal(statSync(join(dir, "bin/setuid")).mode & 0o7777, 0o4711);
  assert.equal(statSync(join(dir, "secret")).mode & 0o7777, 0o700);
  assert.equal(statSync(join(dir, "secret/key")).mode & 0o7777, 0o600);
  assert.equal(statSync(join(dir, "readonly")).mode & 0o7777, 0o555);
  assert.equal(readFileSync(join(dir, "readonly/inside"), "utf8"), "still written");
  assert.equal(statSync(join(dir, "etc/hostname")).mtimeMs, 1700000000 * 1000);
  assert.equal(stats.files, 6);
});

test("applyLayer keeps symlinks as symlinks and hardlinks as one inode", async () => {
  const dir = tempDir("extract");
  const stats = await apply(ORDINARY, dir);
  assert.ok(lstatSync(join(dir, "bin/link")).isSymbolicLink());
  assert.equal(readlinkSync(join(dir, "bin/link")), "tool");
  assert.equal(statSync(join(dir, "bin/hard")).ino, statSync(join(dir, "bin/tool")).ino);
  assert.equal(stats.symlinks, 1);
  assert.equal(stats.hardlinks, 1);
});

test("applyLayer detects gzip, zstd and uncompressed layers by content", async (t) => {
  const missing = requireTool("zstd");
  if (missing) return t.skip(missing);
  const raw = tar(ORDINARY);
  for (const [compression, bytes] of [["none", raw], ["gzip", gzip(raw)], ["zstd", zstd(raw)]] as const) {
    const dir = tempDir(`extract-${compression}`);
    const stats = await applyLayer(streamOf(bytes, 333), dir);
    assert.equal(stats.compression, compression);
    assert.equal(readFileSync(join(dir, "bin/tool"), "utf8"), "#!/bin/sh\necho tool\n");
    assert.deepEqual(new Uint8Array(readFileSync(join(dir, "data/big.bin"))), noise(200_000, 3));
  }
});

test("applyLayer removes what a .wh. whiteout names from lower layers", async () => {
  const dir = tempDir("extract");
  await apply([
    { name: "a/", type: "dir" },
    { name: "a/keep", content: "1" },
    { name: "a/gone", content: "2" },
    { name: "a/gonedir/", type: "dir" },
    { name: "a/gonedir/deep", content: "3" },
  ], dir);
  const stats = await apply([
    { name: "a/.wh.gone", content: "" },
    { name: "a/.wh.gonedir", content: "" },
    { name: "a/.wh.never-existed", content: "" },
  ], dir);
  assert.equal(stats.whiteouts, 3);
  assert.ok(existsSync(join(dir, "a/keep")));
  assert.ok(!existsSync(join(dir, "a/gone")));
  assert.ok(!existsSync(join(dir, "a/gonedir")));
  assert.ok(!existsSync(join(dir, "a/.wh.gone")), "whiteout files themselves are not extracted");
});

test("applyLayer empties an opaque directory of lower-layer entries but keeps its own", async () => {
  const dir = tempDir("extract");
  await apply([
    { name: "d/", type: "dir" },
    { name: "d/lower", content: "old" },
    { name: "d/sub/", type: "dir" },
    { name: "d/sub/lower", content: "old" },
    { name: "other", content: "untouched" },
  ], dir);
  await apply([
    { name: "d/", type: "dir" },
    { name: "d/sub/", type: "dir" },
    { name: "d/sub/upper", content: "new" },
    { name: "d/.wh..wh..opq", content: "" },
    { name: "d/upper", content: "new" },
  ], dir);
  assert.ok(!existsSync(join(dir, "d/lower")));
  assert.ok(!existsSync(join(dir, "d/sub/lower")));
  assert.equal(readFileSync(join(dir, "d/sub/upper"), "utf8"), "new");
  assert.equal(readFileSync(join(dir, "d/upper"), "utf8"), "new");
  assert.equal(readFileSync(join(dir, "other"), "utf8"), "untouched");
  assert.ok(!existsSync(join(dir, "d/.wh..wh..opq")));
});

test("applyLayer reads PAX and GNU long names written by GNU tar", async (t) => {
  const missing = requireTool("tar");
  if (missing) return t.skip(missing);
  const source = tempDir("tar-src");
  const longDir = "directory-with-a-long-name-".repeat(4);
  const longFile = "file-with-a-long-name-".repeat(5) + "é.txt";
  mkdirSync(join(source, longDir), { recursive: true });
  writeFileSync(join(source, longDir, longFile), "long\n");
  symlinkSync(join(longDir, longFile), join(source, "link-" + "x".repeat(120)));
  for (const format of ["gnu", "pax"]) {
    const archive = new Uint8Array(
      execFileSync("tar", ["-C", source, `--format=${format}`, "-cf", "-", "."], { maxBuffer: 1 << 24 }),
    );
    const dir = tempDir(`extract-${format}`);
    await applyLayer(streamOf(archive, 100), dir);
    assert.equal(readFileSync(join(dir, longDir, longFile), "utf8"), "long\n", format);
    assert.equal(readlinkSync(join(dir, "link-" + "x".repeat(120))), join(longDir, longFile), format);
  }
});

test("readTar applies PAX path, linkpath and size records", async () => {
  const records = paxRecord("path", "pax/" + "n".repeat(150)) + paxRecord("linkpath", "t".repeat(130));
  const pax = new TextEncoder().encode(records);
  const archive = concatBytes(
    rawHeader({ name: "PaxHeader", type: "x", size: pax.length }),
    padded(pax),
    rawHeader({ name: "short", type: "2", linkname: "ignored" }),
    rawHeader({ name: "././@LongLink", type: "L", size: 6, magic: "gnu" }),
    padded("gnu/l\0"),
    rawHeader({ name: "cut", type: "0", size: 3, magic: "gnu" }),
    padded("abc"),
    END,
  );
  const seen: string[] = [];
  for await (const entry of readTar(streamOf(archive, 7))) {
    let body = "";
    for await (const chunk of entry.content()) body += new TextDecoder().decode(chunk);
    seen.push(`${entry.header.type} ${entry.header.name} ${entry.header.linkname} ${body}`);
  }
  assert.deepEqual(seen, [
    `symlink pax/${"n".repeat(150)} ${"t".repeat(130)} `,
    "file gnu/l  abc",
  ]);
});

test("applyLayer fails on a truncated layer", async () => {
  const raw = tar(ORDINARY);
  await assert.rejects(apply(raw.slice(0, 5000), tempDir("extract")), LayerError);
});

test("applyLayer skips device nodes and FIFOs and lists them", async () => {
  const archive = concatBytes(
    rawHeader({ name: "dev/null", type: "3" }),
    rawHeader({ name: "run/fifo", type: "6" }),
    rawHeader({ name: "ok", type: "0", size: 2 }),
    padded("ok"),
    END,
  );
  const dir = tempDir("extract");
  const stats = await apply(archive, dir);
  assert.deepEqual(stats.skipped, ["character-device dev/null", "fifo run/fifo"]);
  assert.ok(!existsSync(join(dir, "dev/null")));
  assert.equal(readFileSync(join(dir, "ok"), "utf8"), "ok");
});

test("applyLayer refuses an entry escaping with ../", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  await assertRefused([{ name: "../x", content: "escaped" }], dir, "../x");
  await assertRefused([{ name: "a/../../x", content: "escaped" }], dir, "a/../../x");
  assert.ok(!existsSync(join(parent, "x")));
});

test("applyLayer refuses an absolute entry name", async () => {
  const dir = tempDir("hostile");
  const archive = concatBytes(rawHeader({ name: "/etc/x", type: "0", size: 1 }), padded("x"), END);
  await assertRefused(archive, dir, "/etc/x");
  assert.ok(!existsSync("/etc/x"));
});

test("applyLayer refuses a file written through a symlink to /", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  const victim = `${parent}/victim`;
  await assertRefused(
    [
      { name: "evil", type: "symlink", linkname: "/" },
      { name: `evil${victim}`, content: "owned" },
    ],
    dir,
    `evil${victim}`,
  );
  assert.ok(!existsSync(victim));
});

test("applyLayer refuses a path through a relative symlink leading outside", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  await assertRefused(
    [
      { name: "up", type: "symlink", linkname: "../.." },
      { name: "up/x", content: "owned" },
    ],
    dir,
    "up/x",
  );
  assert.ok(!existsSync(join(parent, "x")));
});

test("applyLayer follows a symlink that stays inside the target", async () => {
  const dir = tempDir("extract");
  await apply([
    { name: "usr/lib/", type: "dir" },
    { name: "lib", type: "symlink", linkname: "usr/lib" },
    { name: "lib/libc.so", content: "elf" },
  ], dir);
  assert.equal(readFileSync(join(dir, "usr/lib/libc.so"), "utf8"), "elf");
});

test("applyLayer replaces a symlink at an entry's own path instead of writing through it", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  const outside = join(parent, "outside-file");
  writeFileSync(outside, "original");
  await apply([
    { name: "trap", type: "symlink", linkname: outside },
    { name: "trap", content: "replaced" },
  ], dir);
  assert.equal(readFileSync(outside, "utf8"), "original");
  assert.ok(lstatSync(join(dir, "trap")).isFile());
  assert.equal(readFileSync(join(dir, "trap"), "utf8"), "replaced");
});

test("applyLayer refuses a hardlink to ../outside", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  writeFileSync(join(parent, "outside"), "secret");
  await assertRefused([{ name: "h", type: "link", linkname: "../outside" }], dir, "h");
  assert.ok(!existsSync(join(dir, "h")));
});

test("applyLayer refuses a hardlink whose target goes through a symlink leading outside", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  writeFileSync(join(parent, "outside"), "secret");
  await assertRefused(
    [
      { name: "p", type: "symlink", linkname: parent },
      { name: "h", type: "link", linkname: "p/outside" },
    ],
    dir,
    "h",
  );
  assert.ok(!existsSync(join(dir, "h")));
});

test("applyLayer refuses whiteouts for . and .. instead of deleting the target's parent", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  writeFileSync(join(parent, "sibling"), "keep");
  await assertRefused([{ name: ".wh...", content: "" }], dir, ".wh...");
  await assertRefused([{ name: "a/.wh..", content: "" }], dir, "a/.wh..");
  await assertRefused([{ name: ".wh.", content: "" }], dir, ".wh.");
  assert.equal(readFileSync(join(parent, "sibling"), "utf8"), "keep");
  assert.ok(existsSync(dir));
});

test("applyLayer never applies a directory's mode through a symlink that replaced it", async () => {
  const parent = tempDir("hostile");
  const dir = join(parent, "root");
  const outside = join(parent, "outside");
  mkdirSync(outside, { mode: 0o755 });
  mkdirSync(join(outside, "sub"), { mode: 0o755 });
  await apply([
    { name: "d/", type: "dir", mode: 0o700 },
    { name: "p/", type: "dir" },
    { name: "p/sub/", type: "dir", mode: 0o700 },
    { name: "d", type: "symlink", linkname: outside },
    { name: "p", type: "symlink", linkname: outside },
  ], dir);
  assert.equal(statSync(outside).mode & 0o777, 0o755);
  assert.equal(statSync(join(outside, "sub")).mode & 0o777, 0o755);
});

test("applyLayer gives the layer's ./ entry's mode and time to an empty target, never to one that holds files", async () => {
  const layer = [{ name: "./", type: "dir" as const, mode: 0o750 }, { name: "f", content: "x" }];
  const fresh = join(tempDir("root-entry"), "new");
  await apply(layer, fresh);
  assert.equal(statSync(fresh).mode & 0o7777, 0o750);
  assert.equal(statSync(fresh).mtimeMs, 1700000000_000);

  const used = tempDir("root-entry");
  writeFileSync(join(used, "mine"), "kept");
  const before = statSync(used);
  await apply(layer, used);
  assert.equal(statSync(used).mode, before.mode);
  assert.notEqual(statSync(used).mtimeMs, 1700000000_000);

  // Asked explicitly (the later layers of an image that started empty), it applies over files too.
  await applyLayer(streamOf(tar(layer)), used, { rootEntry: true });
  assert.equal(statSync(used).mode & 0o7777, 0o750);
  assert.equal(statSync(used).mtimeMs, 1700000000_000);
});

test("applyLayer gives a symlink its own time, dangling or not, without touching its target", async () => {
  const dir = tempDir("symlink-time");
  await apply([
    { name: "target", content: "x" },
    { name: "link", type: "symlink", linkname: "target" },
    { name: "dangling", type: "symlink", linkname: "nowhere" },
  ], dir);
  assert.equal(lstatSync(join(dir, "link")).mtimeMs, 1700000000_000);
  assert.equal(lstatSync(join(dir, "dangling")).mtimeMs, 1700000000_000);
  assert.equal(statSync(join(dir, "target")).mtimeMs, 1700000000_000);
});

test("applyLayer refuses an absolute hardlink target", async () => {
  const dir = tempDir("hostile");
  await assertRefused([{ name: "h", type: "link", linkname: "/etc/passwd" }], dir, "h");
});

for (const server of SERVERS) {
  test(`extractImage unpacks gzip and uncompressed docker-archive images alike (${server.name})`, async () => {
    const f = buildFixtures();
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    for (const ref of [`oci:${f.layout}:latest`, `docker-archive:${f.dockerArchive}`]) {
      const dir = tempDir("extract-image");
      const image = await proxy.openImage(ref);
      const result = await extractImage(proxy, image, dir);
      assert.equal(result.layers.length, 2);
      assert.equal(result.layers[0].compression, ref.startsWith("oci") ? "gzip" : "none");
      assert.equal(readFileSync(join(dir, "etc/os-release"), "utf8"), 'NAME="Fixture Linux"\nVERSION_ID=1\n');
      assert.deepEqual(new Uint8Array(readFileSync(join(dir, "usr/share/big.bin"))), noise(2_500_000, 11));
      assert.equal(readlinkSync(join(dir, "bin/sh")), "hello");
      assert.equal(statSync(join(dir, "bin/hello")).mode & 0o777, 0o755);
      await proxy.closeImage(image);
    }
  });

  test(`extractImage applies zstd layers and whiteouts across layers (${server.name})`, async (t) => {
    const missing = requireTool("zstd");
    if (missing) return t.skip(missing);
    const layout = tempDir("zstd-layout");
    writeOciLayout(layout, [
      layer(
        tar([{ name: "app/", type: "dir" }, { name: "app/old", content: "old" }, {
          name: "app/keep",
          content: "k",
        }]),
        "zstd",
      ),
      layer(
        tar([{ name: "app/.wh.old", content: "" }, { name: "app/new", content: "new", mode: 0o600 }]),
        "zstd",
      ),
    ]);
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const image = await proxy.openImage(`oci:${layout}:latest`);
    const dir = tempDir("extract-zstd");
    const result = await extractImage(proxy, image, dir);
    assert.deepEqual(result.layers.map((l) => l.compression), ["zstd", "zstd"]);
    assert.ok(!existsSync(join(dir, "app/old")));
    assert.equal(readFileSync(join(dir, "app/keep"), "utf8"), "k");
    assert.equal(statSync(join(dir, "app/new")).mode & 0o777, 0o600);
  });

  test(`extractImage fails when a layer does not match its diff id (${server.name})`, async () => {
    const layout = tempDir("bad-diffid");
    writeOciLayout(layout, [layer(tar([{ name: "f", content: "x" }]), "gzip")], {
      diffIds: ["sha256:" + "0".repeat(64)],
    });
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const image = await proxy.openImage(`oci:${layout}:latest`);
    await assert.rejects(extractImage(proxy, image, tempDir("extract")), (err: unknown) => {
      assert.ok(err instanceof LayerError);
      assert.match(err.message, /does not match its diff id/);
      return true;
    });
  });

  test(`extractImage refuses a hostile layer and names the entry and the layer (${server.name})`, async () => {
    const layout = tempDir("hostile-layout");
    writeOciLayout(layout, [
      layer(tar([{ name: "ok", content: "1" }, { name: "../escape", content: "x" }]), "gzip"),
    ]);
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const image = await proxy.openImage(`oci:${layout}:latest`);
    const parent = tempDir("hostile-target");
    await assert.rejects(extractImage(proxy, image, join(parent, "root")), (err: unknown) => {
      assert.ok(err instanceof UnsafeEntryError);
      assert.equal(err.entry, "../escape");
      assert.match(err.message, /of layer sha256:[0-9a-f]{64}/);
      return true;
    });
    assert.ok(!existsSync(join(parent, "escape")));
    // The proxy is still usable after the refused layer's stream was cancelled.
    const { digest } = await proxy.fetchManifest(image);
    assert.match(digest, /^sha256:/);
  });
}
