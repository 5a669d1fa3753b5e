import { test } from "node:test";
import assert from "node:assert/strict";
import { cpSync, existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { ImageProxy } from "../mod.ts";
import { BlobError } from "../mod.ts";
import { BlobCache, listImage, useBlobCache } from "../src/image/inspect.ts";
import { readAll, SERVERS } from "./helpers/env.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import { runCli, tempDir } from "./helpers/cli-helpers.ts";
import { withProxy } from "./helpers/proxy.ts";

const f = buildFixtures();
const REF = `oci:${f.layout}:latest`;
const [LAYER0, LAYER1] = f.image.layers;

/** Counts the proxy's own getBlob calls, under the cache. */
function counted(proxy: ImageProxy): string[] {
  const calls: string[] = [];
  const getBlob = proxy.getBlob.bind(proxy);
  proxy.getBlob = (image, digest, size, options) => {
    calls.push(digest);
    return getBlob(image, digest, size, options);
  };
  return calls;
}

function files(dir: string): string[] {
  return existsSync(join(dir, "blobs", "sha256")) ? readdirSync(join(dir, "blobs", "sha256")).sort() : [];
}

for (const server of SERVERS) {
  test(`the blob cache serves a second read from disk, laid out as an OCI layout's blobs (${server.name})`, async () => {
    const dir = tempDir("cache");
    await withProxy(server, async (proxy) => {
      const calls = counted(proxy);
      useBlobCache(proxy, new BlobCache(dir));
      const image = await proxy.openImage(REF);
      const first = await readAll((await proxy.getDescriptor(image, LAYER1)).stream);
      assert.deepEqual(calls, [LAYER1.digest]);
      assert.deepEqual(files(dir), [LAYER1.digest.slice(7)], "verified blob kept, no temporary file left");
      assert.deepEqual(
        new Uint8Array(readFileSync(join(dir, "blobs", "sha256", LAYER1.digest.slice(7)))),
        LAYER1.data,
      );
      const second = await readAll((await proxy.getDescriptor(image, LAYER1)).stream);
      assert.deepEqual(second, first);
      assert.deepEqual(calls, [LAYER1.digest], "the second read did not reach the proxy");
      const paths: string[] = [];
      for await (const e of listImage(proxy, image)) paths.push(e.path);
      assert.ok(paths.includes("usr/share/big.bin"));
      assert.deepEqual(calls, [LAYER1.digest, LAYER0.digest]);
      await proxy.closeImage(image);
    });
  });

  test(`a corrupted cached blob errors its stream, is removed and fetched again (${server.name})`, async () => {
    const dir = tempDir("cache-corrupt");
    await withProxy(server, async (proxy) => {
      const calls = counted(proxy);
      useBlobCache(proxy, new BlobCache(dir));
      const image = await proxy.openImage(REF);
      await readAll((await proxy.getDescriptor(image, LAYER0)).stream);
      const path = join(dir, "blobs", "sha256", LAYER0.digest.slice(7));
      const bytes = readFileSync(path);
      bytes[100] ^= 0xff;
      writeFileSync(path, bytes);
      await assert.rejects(readAll((await proxy.getDescriptor(image, LAYER0)).stream), BlobError);
      assert.ok(!existsSync(path), "the corrupted blob is gone");
      assert.deepEqual(await readAll((await proxy.getDescriptor(image, LAYER0)).stream), LAYER0.data);
      assert.deepEqual(calls, [LAYER0.digest, LAYER0.digest]);
      await proxy.closeImage(image);
    });
  });

  test(`a blob read only in part, or from a corrupted source, is not cached (${server.name})`, async () => {
    const dir = tempDir("cache-partial");
    await withProxy(server, async (proxy) => {
      useBlobCache(proxy, new BlobCache(dir));
      const image = await proxy.openImage(REF);
      const reader = (await proxy.getDescriptor(image, LAYER1)).stream.getReader();
      await reader.read();
      await reader.cancel();
      assert.deepEqual(files(dir), []);
      const tampered = await proxy.openImage(`oci:${f.tamperedLayout}:latest`);
      await assert.rejects(readAll((await proxy.getDescriptor(tampered, LAYER1)).stream));
      assert.deepEqual(files(dir), [], "unverified bytes never enter the cache");
      await proxy.closeImage(tampered);
      await proxy.closeImage(image);
    });
  });

  test(`the cache evicts the least recently used blobs beyond its size limit, a hit counting as a use (${server.name})`, async () => {
    const dir = tempDir("cache-lru");
    await withProxy(server, async (proxy) => {
      const limit = LAYER0.size + LAYER1.size + 10;
      useBlobCache(proxy, new BlobCache(dir, { maxBytes: limit }));
      const image = await proxy.openImage(REF);
      await readAll((await proxy.getDescriptor(image, LAYER0)).stream);
      await readAll((await proxy.getDescriptor(image, f.image.config)).stream);
      await new Promise((resolve) => setTimeout(resolve, 20));
      await readAll((await proxy.getDescriptor(image, LAYER0)).stream); // A hit: now the most recent.
      assert.equal(files(dir).length, 2);
      await readAll((await proxy.getDescriptor(image, LAYER1)).stream);
      assert.deepEqual(files(dir), [LAYER0.digest.slice(7), LAYER1.digest.slice(7)].sort());
      const total = files(dir).reduce((n, name) => n + statSync(join(dir, "blobs", "sha256", name)).size, 0);
      assert.ok(total <= limit);
      await proxy.closeImage(image);
    });
  });

  test(`--cache DIR serves cat from the cache when the source has lost its layers (${server.name})`, () => {
    const dir = tempDir("cache-cli");
    const layout = join(dir, "layout");
    cpSync(f.layout, layout, { recursive: true });
    const cache = join(dir, "cache");
    const cli = (...args: string[]) =>
      runCli(["--skopeo", server.skopeoCmd.join(" "), "--cache", cache, ...args]);
    const first = cli("cat", `oci:${layout}:latest`, "etc/motd");
    assert.equal(first.status, 0, first.stderr);
    assert.equal(first.text, "welcome\n");
    for (const l of f.image.layers) rmSync(join(layout, "blobs", "sha256", l.digest.slice(7)));
    const second = cli("cat", `oci:${layout}:latest`, "etc/motd");
    assert.equal(second.status, 0, second.stderr);
    assert.equal(second.text, "welcome\n");
    const uncached = runCli([
      "--skopeo",
      server.skopeoCmd.join(" "),
      "cat",
      `oci:${layout}:latest`,
      "etc/motd",
    ]);
    assert.equal(uncached.status, 1, "without the cache the layer is gone");
  });
}
