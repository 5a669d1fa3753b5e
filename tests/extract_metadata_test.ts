import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { lstatSync } from "node:fs";
import { join } from "node:path";
import { applyLayer, LayerLimitError } from "../src/image/extract.ts";
import { xattrAllowed } from "../src/image/metadata.ts";
import { readTar, type TarHeader } from "../src/image/tar.ts";
import {
  concatBytes,
  layer,
  padded,
  rawHeader,
  requireTool,
  runCli,
  streamOf,
  tempDir,
  writeOciLayout,
} from "./helpers/cli-helpers.ts";
import { SERVERS } from "./helpers/env.ts";

const END = new Uint8Array(1024);
const encoder = new TextEncoder();

/** A PAX record whose value is bytes (extended attributes are binary). */
function paxBytes(key: string, value: Uint8Array | string): Uint8Array {
  const bytes = typeof value === "string" ? encoder.encode(value) : value;
  const body = concatBytes(encoder.encode(` ${key}=`), bytes, encoder.encode("\n"));
  let length = body.length + 1;
  while (String(length).length + body.length !== length) length++;
  return concatBytes(encoder.encode(String(length)), body);
}

/** An entry preceded by a PAX header holding `records`. */
function withPax(
  records: Uint8Array[],
  entry: { name: string; type: string; content?: string; linkname?: string; mode?: number },
): Uint8Array {
  const pax = concatBytes(...records);
  const content = encoder.encode(entry.content ?? "");
  return concatBytes(
    rawHeader({ name: "PaxHeader", type: "x", size: pax.length }),
    padded(pax),
    rawHeader({ ...entry, size: content.length }),
    padded(content),
  );
}

async function headers(archive: Uint8Array): Promise<TarHeader[]> {
  const out: TarHeader[] = [];
  for await (const entry of readTar(streamOf(archive, 5))) out.push(entry.header);
  return out;
}

/** `find -printf %T@` of `path` itself, in nanoseconds (what the fidelity test compares). */
function mtimeNs(path: string): bigint {
  const [seconds, fraction] = execFileSync("find", [path, "-maxdepth", "0", "-printf", "%T@"], {
    encoding: "utf8",
  }).split(".");
  return BigInt(seconds) * 1_000_000_000n + BigInt(fraction.padEnd(9, "0").slice(0, 9));
}

/** The extended attributes of `path` itself, name to hex value. */
function xattrsOf(path: string): Record<string, string> {
  const dump = execFileSync("getfattr", [
    "--no-dereference",
    "--absolute-names",
    "-d",
    "-m",
    "-",
    "-e",
    "hex",
    path,
  ], {
    encoding: "utf8",
  });
  return Object.fromEntries(
    dump.split("\n").filter((l) => l.includes("=")).map((l) => l.split(/=(.*)/s).slice(0, 2)),
  );
}

test("readTar keeps PAX times to the nanosecond from their digits, never through a double", async () => {
  const times = [
    "1700000000.123456789",
    "1700000000.9999999999",
    "1700000000.5",
    "1700000000",
    "0.000000001",
  ];
  const archive = concatBytes(
    ...times.map((t, i) => withPax([paxBytes("mtime", t)], { name: `f${i}`, type: "0" })),
    rawHeader({ name: "ustar", type: "0" }),
    END,
  );
  assert.deepEqual((await headers(archive)).map((h) => h.mtimeNs), [
    1700000000123456789n,
    1700000000999999999n,
    1700000000500000000n,
    1700000000000000000n,
    1n,
    1700000000000000000n, // rawHeader's ustar time
  ]);
});

test("readTar hands out SCHILY.xattr records as bytes, NUL, newline and 0xff included", async () => {
  const capability = Uint8Array.from([1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0x0a, 0xff, 0, 0]);
  const archive = concatBytes(
    withPax([
      paxBytes("SCHILY.xattr.security.capability", capability),
      paxBytes("path", "bin/ping"),
      paxBytes("SCHILY.xattr.user.é", "valeur"),
    ], { name: "x", type: "0" }),
    rawHeader({ name: "plain", type: "0" }),
    END,
  );
  const [ping, plain] = await headers(archive);
  assert.equal(ping.name, "bin/ping");
  assert.deepEqual(ping.xattrs, [["security.capability", capability], ["user.é", encoder.encode("valeur")]]);
  assert.equal(plain.xattrs, undefined, "a PAX header's attributes belong to its entry only");
});

test("extended attributes over 64 KiB on one entry are refused with a LayerLimitError", async () => {
  const records = Array.from({ length: 17 }, (_, i) => paxBytes(`SCHILY.xattr.user.a${i}`, "v".repeat(4000)));
  await assert.rejects(
    applyLayer(streamOf(concatBytes(withPax(records, { name: "f", type: "0" }), END)), tempDir("xattr")),
    (err) => err instanceof LayerLimitError && err.limit === "xattrBytes",
  );
});

test("which extended attributes are written: user.* and the capability always, trusted.* and security.* as root, system.* never", () => {
  assert.deepEqual(
    [
      "user.a",
      "security.capability",
      "trusted.overlay.opaque",
      "security.selinux",
      "system.posix_acl_access",
      "other.x",
    ]
      .map((name) => [xattrAllowed(name, false), xattrAllowed(name, true)]),
    [[true, true], [true, true], [false, true], [false, true], [false, false], [false, false]],
  );
});

test("applyLayer writes attributes after owner and mode, so a setuid file keeps its capability, and times to the nanosecond, a symlink's own too", async (t) => {
  const missing = requireTool("getfattr");
  if (missing) return t.skip(missing);
  if (execFileSync("id", ["-u"], { encoding: "utf8" }).trim() !== "0") return t.skip("needs root");
  const capability = Uint8Array.from([1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  const archive = concatBytes(
    withPax([paxBytes("mtime", "1710000000.987654321")], { name: "dir", type: "5", mode: 0o750 }),
    withPax([
      paxBytes("mtime", "1700000000.123456789"),
      paxBytes("SCHILY.xattr.security.capability", capability),
      paxBytes("SCHILY.xattr.user.note", "kept"),
      paxBytes("SCHILY.xattr.system.posix_acl_access", "\x02\0\0\0"),
    ], { name: "dir/tool", type: "0", content: "#!/bin/sh\n", mode: 0o4755 }),
    withPax([paxBytes("mtime", "1650000000.000000007")], { name: "dir/link", type: "2", linkname: "tool" }),
    END,
  );
  const dir = tempDir("xattr");
  const stats = await applyLayer(streamOf(archive), dir);
  const tool = join(dir, "dir", "tool");
  assert.deepEqual(xattrsOf(tool), {
    "security.capability": "0x0100000200200000000000000000000000000000",
    "user.note": "0x6b657074",
  });
  assert.equal(lstatSync(tool).mode & 0o7777, 0o4755);
  assert.equal(mtimeNs(tool), 1700000000123456789n);
  assert.equal(mtimeNs(join(dir, "dir", "link")), 1650000000000000007n);
  assert.equal(mtimeNs(join(dir, "dir")), 1710000000987654321n);
  assert.deepEqual([stats.xattrs, stats.xattrsSkipped], [2, 1]);

  const without = tempDir("xattr");
  const skipped = await applyLayer(streamOf(archive), without, { xattrs: false });
  assert.deepEqual(xattrsOf(join(without, "dir", "tool")), {});
  assert.deepEqual([skipped.xattrs, skipped.xattrsSkipped], [0, 3]);
});

const server = SERVERS[0];
if (server !== undefined) {
  test(`the CLI's extract counts extended attributes in its summary, and --no-xattrs writes none (${server.name})`, (t) => {
    const missing = requireTool("getfattr");
    if (missing) return t.skip(missing);
    const layout = tempDir("xattr-layout");
    const archive = concatBytes(
      withPax([paxBytes("SCHILY.xattr.user.note", "kept")], { name: "f", type: "0", content: "x" }),
      END,
    );
    writeOciLayout(layout, [layer(archive, "gzip")]);
    const summaries = [[], ["--no-xattrs"]].map((extra) => {
      const dir = join(tempDir("xattr-cli"), "rootfs");
      const run = runCli([
        "--skopeo",
        server.skopeoCmd.join(" "),
        "extract",
        `oci:${layout}:latest`,
        dir,
        ...extra,
      ]);
      assert.equal(run.status, 0, run.stderr);
      const { xattrs, xattrsSkipped } = run.json() as { xattrs: number; xattrsSkipped: number };
      return [xattrs, xattrsSkipped, xattrsOf(join(dir, "f"))["user.note"] ?? "(none)"];
    });
    assert.deepEqual(summaries, [[1, 0, "0x6b657074"], [0, 1, "(none)"]]);
  });
}
