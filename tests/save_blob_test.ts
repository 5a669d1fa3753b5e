// saveBlob: blobs verified by the proxy, moved from skopeo's pipe into a file by the adapter with
// splice(2) (on Deno's thread pool; polled without waiting under Bun), against both real skopeo servers.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlobError, ImageProxy, ImageProxyError, ProxyExitedError } from "../mod.ts";
import { assertNoLeakedFds, openFds, readAll, SERVERS, within } from "./helpers/env.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import { withoutFileSinks, withProxy } from "./helpers/proxy.ts";
import { startStandInRegistry } from "./helpers/concurrency-registry.ts";
import { childPids } from "./helpers/concurrency-procs.ts";

const fixtures = buildFixtures();
const LATEST = `oci:${fixtures.layout}:latest`;

function scratch(): string {
  return mkdtempSync(join(tmpdir(), "cip-save-"));
}

for (const server of SERVERS) {
  const at = `(${server.name})`;

  test(`saveBlob on a transport that cannot save blobs fails clearly, before any request ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      assert.equal(proxy.canSaveBlobs, false);
      const img = await proxy.openImage(LATEST);
      // A blob the image does not have: had GetBlob been sent, skopeo's "unknown blob" would come back.
      const absent = `sha256:${"0".repeat(64)}`;
      const dir = scratch();
      try {
        await assert.rejects(
          proxy.saveBlob(img, absent, 1, join(dir, "blob")),
          (err: unknown) => err instanceof ImageProxyError && /cannot save blobs.*getBlob/.test(err.message),
        );
        assert.equal(existsSync(join(dir, "blob")), false);
        // Nothing was asked of the proxy: it serves the next request.
        assert.equal((await proxy.fetchManifest(img)).digest, fixtures.image.manifest.digest);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }, { transport: await withoutFileSinks() });
  });

  test(`saveBlob writes every blob byte for byte, several at once, and reports progress ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      assert.equal(proxy.canSaveBlobs, true, "both adapters save blobs");
      const img = await proxy.openImage(LATEST);
      const { manifest } = await proxy.fetchManifest(img);
      const dir = scratch();
      try {
        const progress = manifest.layers.map(() => 0);
        // Every layer saved at once, with a streamed config read alongside on the same proxy.
        const [sizes, config] = await Promise.all([
          Promise.all(
            manifest.layers.map((layer, i) =>
              proxy.saveBlob(img, layer.digest, layer.size, join(dir, `layer-${i}`), {
                onProgress: (n) => {
                  assert.ok(n > 0);
                  progress[i] += n;
                },
              })
            ),
          ),
          proxy.getDescriptor(img, manifest.config).then((blob) => readAll(blob.stream)),
        ]);
        assert.deepEqual(config, fixtures.image.configBytes);
        for (const [i, layer] of manifest.layers.entries()) {
          assert.equal(sizes[i], layer.size);
          assert.equal(progress[i], layer.size);
          assert.deepEqual(
            new Uint8Array(readFileSync(join(dir, `layer-${i}`))),
            fixtures.image.layers[i].data,
          );
        }
        // An existing file is replaced, not appended to.
        const layer = manifest.layers[0];
        await proxy.saveBlob(img, layer.digest, layer.size, join(dir, "layer-1"));
        assert.deepEqual(new Uint8Array(readFileSync(join(dir, "layer-1"))), fixtures.image.layers[0].data);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  test(`saveBlob rejects a blob whose bytes do not match its digest, and the proxy still serves ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(`oci:${fixtures.tamperedLayout}:latest`);
      const { manifest } = await proxy.fetchManifest(img);
      const dir = scratch();
      try {
        const bad = manifest.layers[1];
        let moved = 0;
        await assert.rejects(
          proxy.saveBlob(img, bad.digest, bad.size, join(dir, "bad"), { onProgress: (n) => moved += n }),
          (err: unknown) => {
            assert.ok(err instanceof BlobError, String(err));
            assert.equal(err.retryable, false);
            assert.equal(err.digest, bad.digest);
            assert.match(err.message, /corrupted blob|digest/i);
            return true;
          },
        );
        assert.equal(moved, bad.size, "every byte was moved before the verdict");
        const good = manifest.layers[0];
        assert.equal(await proxy.saveBlob(img, good.digest, good.size, join(dir, "good")), good.size);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  test(`saveBlob fails clearly on a wrong size, a missing folder and a full disk ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1];
      const size = layer.data.length;
      const dir = scratch();
      try {
        await assert.rejects(
          proxy.saveBlob(img, layer.digest, size + 1, join(dir, "wrong-size")),
          (err: unknown) => err instanceof BlobError && /bytes, but \d+ were expected/.test(err.message),
        );
        assert.equal(existsSync(join(dir, "wrong-size")), false, "no file is made for a refused blob");
        await assert.rejects(
          proxy.saveBlob(img, layer.digest, size, join(dir, "missing", "blob")),
          (err: unknown) =>
            err instanceof ImageProxyError &&
            /Cannot open ".*missing\/blob".*No such file or directory/.test(err.message),
        );
        // /dev/full takes no splice: the adapter falls back to writing, which the device refuses.
        await assert.rejects(
          proxy.saveBlob(img, layer.digest, size, "/dev/full"),
          (err: unknown) =>
            err instanceof ImageProxyError &&
            /"\/dev\/full" failed: No space left on device/.test(err.message),
        );
        await assert.rejects(proxy.saveBlob(img, layer.digest, size, ""), TypeError);
        // After each failure the proxy still serves the same blob in full.
        assert.equal(await proxy.saveBlob(img, layer.digest, size, join(dir, "ok")), size);
        assert.deepEqual(new Uint8Array(readFileSync(join(dir, "ok"))), layer.data);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  test(`saveBlob aborted through its signal mid-blob rejects with the reason and the proxy still serves ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1];
      const dir = scratch();
      try {
        const controller = new AbortController();
        const reason = new Error("enough");
        let moved = 0;
        await assert.rejects(
          within(
            proxy.saveBlob(img, layer.digest, layer.data.length, join(dir, "aborted"), {
              signal: controller.signal,
              onProgress: (n) => {
                moved += n;
                controller.abort(reason);
              },
            }),
            10_000,
            "the aborted saveBlob",
          ),
          (err: unknown) => err === reason,
        );
        assert.ok(moved > 0 && moved < layer.data.length, `aborted mid-blob (${moved} bytes)`);
        assert.equal(
          await within(
            proxy.saveBlob(img, layer.digest, layer.data.length, join(dir, "again")),
            10_000,
            "again",
          ),
          layer.data.length,
        );
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  test(`skopeo killed with SIGKILL mid-save rejects saveBlob with its exit ${at}`, async () => {
    const before = openFds();
    const children = childPids();
    const proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const dir = scratch();
    try {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1];
      let killed = false;
      await assert.rejects(
        within(
          proxy.saveBlob(img, layer.digest, layer.data.length, join(dir, "blob"), {
            onProgress: () => {
              if (!killed) process.kill(proxy.pid!, "SIGKILL");
              killed = true;
            },
          }),
          10_000,
          "saveBlob after SIGKILL",
        ),
        (err: unknown) => {
          assert.ok(err instanceof ProxyExitedError, String(err));
          assert.equal(err.status.signal, "SIGKILL");
          return true;
        },
      );
      assert.ok(killed);
      await assert.rejects(proxy.shutdown(), /signal SIGKILL/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    await assertNoLeakedFds(before);
    assert.deepEqual(childPids(), children);
  });

  test(`saveBlob from a registry that stalls mid-blob fails with a retryable BlobError ${at}`, async () => {
    const registry = await startStandInRegistry();
    const dir = scratch();
    try {
      await withProxy(server, async (proxy) => {
        const img = await proxy.openImage(registry.ref("stall"));
        const { layer } = registry;
        let moved = 0;
        const started = Date.now();
        await assert.rejects(
          within(
            proxy.saveBlob(img, layer.digest, layer.size, join(dir, "stalled"), {
              onProgress: (n) => moved += n,
            }),
            10_000,
            "saveBlob to give up on the stalled blob",
          ),
          (err: unknown) => {
            assert.ok(err instanceof BlobError, String(err));
            assert.equal(err.retryable, true);
            assert.match(err.message, /stalled/);
            return true;
          },
        );
        assert.equal(moved, registry.stalledAfter, "every byte the registry sent reached the file");
        assert.ok(Date.now() - started >= 500);
        // The proxy is not held by the stalled copy.
        const config = registry.config;
        assert.equal(
          await within(
            proxy.saveBlob(img, config.digest, config.size, join(dir, "config")),
            10_000,
            "config",
          ),
          config.size,
        );
        assert.deepEqual(new Uint8Array(readFileSync(join(dir, "config"))), config.data);
      }, { insecureSkipTlsVerification: true, blobIdleTimeoutMs: 500 });
    } finally {
      await registry.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
