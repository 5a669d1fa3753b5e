import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { cpSync, existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ImageProxy } from "../mod.ts";
import { type CliIo, run } from "../src/cli/main.ts";
import { parseArgs } from "../src/cli/args.ts";
import { NEW_SERVER, type Server, SERVERS } from "./helpers/env.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import { cliCommand, runCli, tempDir } from "./helpers/cli-helpers.ts";
import { countingTransport } from "./helpers/proxy.ts";

const f = buildFixtures();
const REF = `oci:${f.layout}:latest`;
const BLOBS = [f.image.config, ...f.image.layers].map((b) => b.digest.slice(7)).sort();
const BLOB_REQUESTS = new Set(["GetBlob", "GetRawBlob"]);

/** Runs the CLI in this process on `server`, and returns the blob requests that reached skopeo. */
async function blobRequests(server: Server, ...args: string[]): Promise<string[]> {
  const { factory, methods } = await countingTransport();
  const stderr: string[] = [];
  const io: CliIo = {
    args: ["--skopeo", server.skopeoCmd.join(" "), ...args],
    writeStdout: () => Promise.resolve(),
    writeStderr: (text) => void stderr.push(text),
    stderrIsTerminal: false,
    columns: () => 80,
    now: () => 0,
    onInterrupt: () => () => {},
  };
  const status = await run(io, { spawn: (config) => ImageProxy.spawn({ ...config, transport: factory }) });
  assert.equal(status, 0, `${args.join(" ")}: ${stderr.join("")}`);
  return methods.filter((m) => BLOB_REQUESTS.has(m));
}

function cached(dir: string): string[] {
  const blobs = join(dir, "blobs", "sha256");
  return existsSync(blobs) ? readdirSync(blobs).sort() : [];
}

function layoutBlob(layout: string, hex: string): Uint8Array {
  return new Uint8Array(readFileSync(join(layout, "blobs", "sha256", hex)));
}

for (const server of SERVERS) {
  test(`with a warm cache, extract, export, fetch --output, cat and ls make no blob request (${server.name})`, async () => {
    const dir = tempDir("cache-readers");
    const cache = join(dir, "cache");
    const first = await blobRequests(server, "--cache", cache, "fetch", REF, "--output", join(dir, "a"));
    assert.deepEqual(first, ["GetBlob", "GetBlob", "GetBlob"], "the cold fetch saved every blob");
    assert.deepEqual(cached(cache), BLOBS, "fetch --output filled the cache, no temporary file left");
    for (const hex of BLOBS) assert.deepEqual(layoutBlob(cache, hex), layoutBlob(f.layout, hex));

    const warm = [
      ["extract", REF, join(dir, "root")],
      ["export", REF, "-o", join(dir, "export.tar")],
      ["fetch", REF, "--output", join(dir, "b")],
      ["cat", REF, "etc/motd"],
      ["ls", REF],
      ["fetch", REF],
      ...(server.protocol === "0.2.8" ? [["fetch", REF, "--raw-blobs", "--output", join(dir, "c")]] : []),
    ];
    for (const args of warm) {
      assert.deepEqual(await blobRequests(server, "--cache", cache, ...args), [], args[0]);
    }
    assert.equal(readFileSync(join(dir, "root", "etc", "motd"), "utf8"), "welcome\n");
    for (const layout of ["b", ...(server.protocol === "0.2.8" ? ["c"] : [])]) {
      for (const hex of BLOBS) {
        assert.deepEqual(layoutBlob(join(dir, layout), hex), layoutBlob(f.layout, hex));
      }
    }
  });

  test(`fetch --output replaces a corrupted cached blob with a verified one and writes a valid layout (${server.name})`, async () => {
    const dir = tempDir("cache-save-corrupt");
    const cache = join(dir, "cache");
    assert.deepEqual(await blobRequests(server, "--cache", cache, "ls", REF), [
      "GetBlob",
      "GetBlob",
    ]);
    const hex = f.image.layers[0].digest.slice(7);
    const bytes = layoutBlob(cache, hex);
    bytes[10] ^= 0xff;
    writeFileSync(join(cache, "blobs", "sha256", hex), bytes);
    const requests = await blobRequests(server, "--cache", cache, "fetch", REF, "--output", join(dir, "a"));
    assert.equal(
      requests.length,
      2,
      "the config and the corrupted layer were fetched, the good layer was not",
    );
    assert.deepEqual(layoutBlob(join(dir, "a"), hex), layoutBlob(f.layout, hex));
    assert.deepEqual(
      layoutBlob(cache, hex),
      layoutBlob(f.layout, hex),
      "the cache holds the verified blob again",
    );
  });
}

test("fetch --raw-blobs fills the cache that extract then reads", {
  skip: NEW_SERVER ? false : "no skopeo 1.22",
}, async () => {
  const server = NEW_SERVER!;
  const dir = tempDir("cache-raw");
  const cache = join(dir, "cache");
  assert.deepEqual(await blobRequests(server, "--cache", cache, "fetch", REF, "--raw-blobs"), [
    "GetRawBlob",
    "GetRawBlob",
    "GetRawBlob",
  ]);
  assert.deepEqual(cached(cache), BLOBS);
  assert.deepEqual(await blobRequests(server, "--cache", cache, "extract", REF, join(dir, "root")), []);
});

/** Runs the CLI as a child process and resolves with its exit status and stderr. */
function cliProcess(args: string[]): Promise<{ status: number | null; stderr: string }> {
  const [command, ...prefix] = cliCommand();
  return new Promise((resolve, reject) => {
    const child = spawn(command, [...prefix, ...args], { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr!.on("data", (chunk) => stderr += chunk.toString());
    child.once("error", reject);
    child.once("close", (status) => resolve({ status, stderr }));
  });
}

for (const server of SERVERS) {
  test(`two processes fill one cache at once, and both succeed (${server.name})`, async () => {
    const dir = tempDir("cache-two");
    const cache = join(dir, "cache");
    const source = join(dir, "source");
    cpSync(f.layout, source, { recursive: true });
    const ref = `oci:${source}:latest`;
    const common = ["--skopeo", server.skopeoCmd.join(" "), "--cache", cache];
    const [a, b] = await Promise.all([
      cliProcess([...common, "fetch", ref, "--output", join(dir, "a")]),
      cliProcess([...common, "extract", ref, join(dir, "root")]),
    ]);
    assert.equal(a.status, 0, a.stderr);
    assert.equal(b.status, 0, b.stderr);
    assert.deepEqual(cached(cache), BLOBS, "each blob once, no temporary file left");
    // The source loses its layers: only the cache can serve them now.
    for (const layer of f.image.layers) rmSync(join(source, "blobs", "sha256", layer.digest.slice(7)));
    const again = runCli([...common, "fetch", ref, "--output", join(dir, "b")]);
    assert.equal(again.status, 0, again.stderr);
    const exported = runCli([...common, "export", ref, "-o", join(dir, "export.tar")]);
    assert.equal(exported.status, 0, exported.stderr);
  });
}

test("--cache-size takes bytes with a K, M, G or T suffix, and needs --cache", () => {
  const parse = (...args: string[]) => parseArgs([...args, "ls", "oci:/x:1"]);
  assert.equal(parse("--cache", "/c", "--cache-size", "512M").cacheSize, 512 * 2 ** 20);
  assert.equal(parse("--cache", "/c", "--cache-size=2g").cacheSize, 2 * 2 ** 30);
  assert.equal(parse("--cache", "/c", "--cache-size", "1000").cacheSize, 1000);
  assert.equal(parse("--cache", "/c").cacheSize, undefined);
  assert.throws(() => parse("--cache", "/c", "--cache-size", "1.5G"), /takes a number of bytes/);
  assert.throws(() => parse("--cache", "/c", "--cache-size", "-1"), /takes a number of bytes/);
  assert.throws(() => parse("--cache-size", "1G"), /needs --cache DIR/);
});

test(
  "--cache-size bounds the cache the CLI fills",
  { skip: SERVERS.length === 0 ? "no skopeo" : false },
  async () => {
    const cache = join(tempDir("cache-size"), "cache");
    const largest = Math.max(...f.image.layers.map((l) => l.size));
    await blobRequests(SERVERS[0], "--cache", cache, "--cache-size", String(largest), "ls", REF);
    assert.equal(cached(cache).length, 1, "the older layer was evicted");
  },
);
