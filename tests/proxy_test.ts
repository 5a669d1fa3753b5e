// Integration tests: every protocol method against real skopeo, both protocol versions, on fixtures the
// tests build themselves. Every test checks that no fd leaked and no child was left behind.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { gunzipSync } from "node:zlib";
import {
  BlobError,
  ConfigurationError,
  ImageProxy,
  ImageReference,
  InvalidReferenceError,
  ProxyClosedError,
  ProxyExitedError,
  RequestError,
  SpawnError,
  UnsupportedMethodError,
} from "../mod.ts";
import { withProxy } from "./helpers/proxy.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import {
  assertNoLeakedFds,
  openFds,
  processAlive,
  processStopped,
  readAll,
  readProcFile,
  SERVERS,
  waitFor,
} from "./helpers/env.ts";

const fixtures = buildFixtures();
const LATEST = `oci:${fixtures.layout}:latest`;

/** The number of pipe fds open in process `pid`. */
function processPipes(pid: number): number {
  const links = execFileSync("sh", ["-c", `ls -l /proc/${pid}/fd`], { encoding: "utf8" });
  return links.split("\n").filter((line) => line.includes("-> pipe:")).length;
}

/** Waits until `value()` has not changed for `quietMs` (polling, no fixed sleep), failing after `ms`. */
async function waitForStable(value: () => string, quietMs: number, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  let last = value();
  let since = Date.now();
  while (Date.now() - since < quietMs) {
    if (Date.now() > deadline) throw new Error(`Still changing after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 10));
    const now = value();
    if (now !== last) {
      last = now;
      since = Date.now();
    }
  }
}

function sha256(data: Uint8Array): string {
  return "sha256:" + createHash("sha256").update(data).digest("hex");
}

for (const server of SERVERS) {
  const at = `(${server.name})`;
  const modern = server.protocol === "0.2.8";

  test(`spawn reports protocol ${server.protocol} ${at}`, async () => {
    await withProxy(server, (proxy) => {
      assert.equal(proxy.protocolVersion, server.protocol);
      assert.equal(typeof proxy.pid, "number");
      assert.ok(processAlive(proxy.pid!));
    });
  });

  test(`fetchManifest returns the stored manifest and its digest from an OCI layout ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const { digest, raw } = await proxy.fetchManifestRaw(img);
      assert.equal(digest, fixtures.image.manifest.digest);
      assert.deepEqual(raw, fixtures.image.manifestBytes);
      const { manifest } = await proxy.fetchManifest(img);
      assert.deepEqual(manifest.layers.map((l) => l.digest), fixtures.image.layers.map((l) => l.digest));
      await proxy.closeImage(img);
    });
  });

  test(`fetchConfig returns the full image configuration ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(ImageReference.parse(LATEST));
      const config = await proxy.fetchConfig(img);
      const expected = JSON.parse(new TextDecoder().decode(fixtures.image.configBytes));
      assert.equal(config.architecture, "amd64");
      assert.equal(config.os, "linux");
      assert.deepEqual(config.rootfs, expected.rootfs);
      assert.deepEqual(config.config?.Labels, { "org.example.fixture": "yes" });
      const raw = await proxy.fetchConfigRaw(img);
      assert.deepEqual(JSON.parse(new TextDecoder().decode(raw)).rootfs, expected.rootfs);
      const runtime = await proxy.fetchRuntimeConfig(img);
      assert.deepEqual(runtime.Cmd, ["/bin/sh"]);
    });
  });

  test(`getBlob streams every layer and the config byte for byte ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const { manifest } = await proxy.fetchManifest(img);
      for (const [i, layer] of manifest.layers.entries()) {
        const blob = await proxy.getDescriptor(img, layer);
        assert.equal(blob.size, layer.size);
        assert.deepEqual(await readAll(blob.stream), fixtures.image.layers[i].data);
      }
      const config = await proxy.getDescriptor(img, manifest.config);
      assert.deepEqual(await readAll(config.stream), fixtures.image.configBytes);
    });
  });

  test(`getBlob errors the stream when the blob on disk does not match its digest ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(`oci:${fixtures.tamperedLayout}:latest`);
      const { manifest } = await proxy.fetchManifest(img);
      const { stream } = await proxy.getDescriptor(img, manifest.layers[1]);
      let received = 0;
      await assert.rejects(
        (async () => {
          for await (const chunk of stream) received += chunk.length;
        })(),
        (err: unknown) => {
          assert.ok(err instanceof BlobError, String(err));
          assert.match(err.message, /corrupted blob|digest/i);
          assert.equal(err.retryable, false);
          return true;
        },
      );
      assert.equal(received, manifest.layers[1].size, "every byte arrives before the verdict");
      // The proxy stays usable after a failed blob.
      const ok = await proxy.getDescriptor(img, manifest.layers[0]);
      assert.equal((await readAll(ok.stream)).length, manifest.layers[0].size);
    });
  });

  test(`getBlob with a wrong size fails with a BlobError and the proxy stays usable ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[0];
      await assert.rejects(proxy.getBlob(img, layer.digest, layer.size + 10), (err: unknown) => {
        assert.ok(err instanceof BlobError, String(err));
        assert.match(err.message, new RegExp(`${layer.size} bytes, but ${layer.size + 10}`));
        return true;
      });
      await assert.rejects(proxy.getBlob(img, layer.digest, layer.size - 10), BlobError);
      const ok = await proxy.getBlob(img, layer.digest, layer.size);
      assert.deepEqual(await readAll(ok.stream), layer.data);
    });
  });

  test(`getBlob for a digest the image lacks fails with a RequestError ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      await assert.rejects(proxy.getBlob(img, "sha256:" + "ab".repeat(32), 10), (err: unknown) => {
        assert.ok(err instanceof RequestError, String(err));
        assert.equal(err.method, "GetBlob");
        return true;
      });
      await assert.rejects(proxy.getBlob(img, "sha256:nothex", 10), RangeError);
      await assert.rejects(proxy.getBlob(img, fixtures.image.layers[0].digest, -1), RangeError);
    });
  });

  test(`getRawBlob ${modern ? "streams and verifies on the client" : "needs protocol 0.2.8"} ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1];
      if (!modern) {
        await assert.rejects(proxy.getRawBlob(img, layer.digest), (err: unknown) => {
          assert.ok(err instanceof UnsupportedMethodError);
          assert.equal(err.requiredVersion, "0.2.8");
          assert.match(err.message, /GetRawBlob.*0\.2\.8/);
          return true;
        });
        return;
      }
      const blob = await proxy.getRawBlob(img, layer.digest);
      assert.equal(blob.size, layer.size);
      const data = await readAll(blob.stream);
      assert.equal(sha256(data), layer.digest);
      assert.deepEqual(data, layer.data);
    });
  });

  if (modern) {
    test(`getRawBlob errors the stream when the content does not match the digest ${at}`, async () => {
      await withProxy(server, async (proxy) => {
        const img = await proxy.openImage(`oci:${fixtures.tamperedLayout}:latest`);
        const { manifest } = await proxy.fetchManifest(img);
        const { stream } = await proxy.getRawBlob(img, manifest.layers[1].digest);
        await assert.rejects(readAll(stream), (err: unknown) => {
          assert.ok(err instanceof BlobError, String(err));
          assert.match(err.message, /corrupted/);
          assert.equal(err.retryable, false);
          return true;
        });
        const again = await proxy.getRawBlob(img, manifest.layers[0].digest);
        assert.equal((await readAll(again.stream)).length, manifest.layers[0].size);
      });
    });

    test(`getRawBlob cancelled early leaves the proxy usable ${at}`, async () => {
      await withProxy(server, async (proxy) => {
        const img = await proxy.openImage(LATEST);
        const layer = fixtures.image.layers[1];
        const { stream } = await proxy.getRawBlob(img, layer.digest);
        const reader = stream.getReader();
        await reader.read();
        await reader.cancel();
        const again = await proxy.getRawBlob(img, layer.digest);
        assert.deepEqual(await readAll(again.stream), layer.data);
      });
    });
  }

  test(`getLayerInfo ${modern ? "describes every layer" : "is null before protocol 0.2.5"} ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layers = await proxy.getLayerInfo(img);
      if (!modern) {
        assert.equal(layers, null);
        return;
      }
      assert.deepEqual(
        layers,
        fixtures.image.layers.map((l) => ({ digest: l.digest, size: l.size, media_type: l.mediaType })),
      );
    });
  });

  test(`openImageOptional ${modern ? "returns null for a missing tag" : "needs protocol 0.2.4"} ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const missing = `oci:${fixtures.layout}:no-such-tag`;
      if (!modern) {
        await assert.rejects(proxy.openImageOptional(missing), (err: unknown) => {
          assert.ok(err instanceof UnsupportedMethodError);
          assert.equal(err.requiredVersion, "0.2.4");
          assert.match(err.message, /needs proxy protocol version 0\.2\.4/);
          return true;
        });
        return;
      }
      assert.equal(await proxy.openImageOptional(missing), null);
      const img = await proxy.openImageOptional(LATEST);
      assert.ok(img);
      assert.equal((await proxy.fetchManifest(img)).digest, fixtures.image.manifest.digest);
    });
  });

  test(`openImage of a missing image fails with a RequestError naming it ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const missing = `oci:${fixtures.layout}:no-such-tag`;
      await assert.rejects(proxy.openImage(missing), (err: unknown) => {
        assert.ok(err instanceof RequestError, String(err));
        assert.equal(err.method, "OpenImage");
        assert.ok(err.message.includes(missing), err.message);
        return true;
      });
      // Still usable.
      await proxy.openImage(LATEST);
    });
  });

  test(`every transport serves the same layers: oci, oci-archive, docker-archive, dir ${at}`, async () => {
    const expected = fixtures.image.layers.map((l) => sha256(gunzipSync(l.data)));
    await withProxy(server, async (proxy) => {
      for (
        const ref of [
          LATEST,
          `oci-archive:${fixtures.ociArchive}:latest`,
          `docker-archive:${fixtures.dockerArchive}`,
          `dir:${fixtures.dir}`,
        ]
      ) {
        const img = await proxy.openImage(ref);
        const { manifest } = await proxy.fetchManifest(img);
        const config = await proxy.fetchConfig(img);
        assert.equal(config.rootfs.diff_ids.length, 2, ref);
        const contents: string[] = [];
        for (const layer of manifest.layers) {
          const data = await readAll((await proxy.getDescriptor(img, layer)).stream);
          assert.equal(sha256(data), layer.digest, ref);
          // docker-archive carries uncompressed layers whatever the media type says: trust the bytes.
          contents.push(sha256(data[0] === 0x1f && data[1] === 0x8b ? gunzipSync(data) : data));
        }
        assert.deepEqual(contents, expected, ref);
        await proxy.closeImage(img);
      }
    });
  });

  test(`a multi-arch index resolves to the instance for the platform, and its digest ${at}`, async () => {
    const ref = `oci:${fixtures.multiLayout}:latest`;
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(ref);
      const { digest } = await proxy.fetchManifest(img);
      assert.equal(digest, fixtures.multi.amd64.manifest.digest);
      assert.notEqual(digest, fixtures.multi.index.digest);
    });
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(ref);
      const { digest } = await proxy.fetchManifest(img);
      assert.equal(digest, fixtures.multi.arm64.manifest.digest);
      assert.equal((await proxy.fetchConfig(img)).architecture, "arm64");
    }, { overrideArch: "arm64", overrideOs: "linux" });
  });

  test(`a closed image cannot be used ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      await proxy.closeImage(img);
      await assert.rejects(proxy.fetchManifest(img), ProxyClosedError);
      await assert.rejects(proxy.getBlob(img, fixtures.image.layers[0].digest, 1), /has been closed/);
      await assert.rejects(proxy.closeImage(img), ProxyClosedError);
    });
  });

  test(`calls after shutdown fail with ProxyClosedError and skopeo is gone ${at}`, async () => {
    const before = openFds();
    const proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const img = await proxy.openImage(LATEST);
    await proxy.shutdown();
    await proxy.shutdown(); // idempotent
    assert.ok(!processAlive(proxy.pid!));
    await assert.rejects(proxy.fetchManifest(img), ProxyClosedError);
    await assert.rejects(proxy.openImage(LATEST), /shut down/);
    await assertNoLeakedFds(before);
  });

  test(`await using shuts the proxy down ${at}`, async () => {
    let pid = 0;
    {
      await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
      pid = proxy.pid!;
      await proxy.openImage(LATEST);
    }
    assert.ok(!processAlive(pid));
  });

  test(`two blob streams read in reverse order both complete ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const [a, b] = fixtures.image.layers;
      const first = await proxy.getBlob(img, a.digest, a.size);
      const second = await proxy.getBlob(img, b.digest, b.size);
      const manifest = await proxy.fetchManifest(img); // other requests still go through
      assert.equal(manifest.digest, fixtures.image.manifest.digest);
      assert.deepEqual(await readAll(second.stream), b.data);
      assert.deepEqual(await readAll(first.stream), a.data);
    });
  });

  test(`a cancelled blob stream leaves the proxy usable ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1];
      const { stream } = await proxy.getBlob(img, layer.digest, layer.size);
      const reader = stream.getReader();
      const { value } = await reader.read();
      assert.ok(value && value.length > 0 && value.length < layer.size);
      await reader.cancel();
      const again = await proxy.getBlob(img, layer.digest, layer.size);
      assert.deepEqual(await readAll(again.stream), layer.data);
    });
  });

  test(`a cancelled blob whose pipe is full is settled with FinishPipe and skopeo closes its end ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const pid = proxy.pid!;
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1]; // 2.5 MB: more than the 1 MiB pipe and one read hold
      const baseline = processPipes(pid);
      const { stream } = await proxy.getBlob(img, layer.digest, layer.size);
      // skopeo closes its copy of the read end only after sending it: the reply can come first.
      await waitFor(
        () => processPipes(pid) === baseline + 1,
        3000,
        "only the pipe's write end open in skopeo",
      );
      // skopeo stops reading the layer once the pipe is full and its writer blocks.
      await waitForStable(() => readProcFile(`/proc/${pid}/io`).match(/^rchar: (\d+)/m)![1], 150, 5000);
      await stream.cancel();
      await waitFor(
        () => processPipes(pid) === baseline,
        3000,
        "skopeo to close the write end after FinishPipe",
      );
      assert.equal((await proxy.fetchManifest(img)).digest, fixtures.image.manifest.digest);
    });
  });

  test(`received pipe fds are close-on-exec, so no other child inherits them ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1];
      const before = openFds();
      const { stream } = await proxy.getBlob(img, layer.digest, layer.size);
      const received = [...openFds()].filter(([fd, target]) =>
        before.get(fd) !== target && target.startsWith("pipe:")
      );
      // Our received fd, and under Bun also the copy its file reader makes: every one must be CLOEXEC.
      assert.ok(received.length >= 1, "the blob pipe is open");
      for (const [fd] of received) {
        const flags = Number.parseInt(
          /^flags:\s+(\d+)/m.exec(readProcFile(`/proc/${process.pid}/fdinfo/${fd}`))![1],
          8,
        );
        assert.ok(flags & 0o2000000, `fd ${fd} has O_CLOEXEC (flags ${flags.toString(8)})`);
      }
      assert.equal((await readAll(stream)).length, layer.size);
    });
  });

  test(`an aborted signal errors the blob stream with its reason ${at}`, async () => {
    await withProxy(server, async (proxy) => {
      const img = await proxy.openImage(LATEST);
      const layer = fixtures.image.layers[1];
      const controller = new AbortController();
      const { stream } = await proxy.getBlob(img, layer.digest, layer.size, { signal: controller.signal });
      const reader = stream.getReader();
      await reader.read();
      controller.abort(new Error("user gave up"));
      await assert.rejects(
        (async () => {
          for (;;) if ((await reader.read()).done) break;
        })(),
        /user gave up/,
      );
      const aborted = AbortSignal.abort(new Error("before start"));
      await assert.rejects(proxy.getBlob(img, layer.digest, layer.size, { signal: aborted }), /before start/);
      const again = await proxy.getBlob(img, layer.digest, layer.size);
      assert.equal((await readAll(again.stream)).length, layer.size);
    });
  });

  test(`skopeo killed with SIGKILL mid-stream errors the stream with its exit ${at}`, async () => {
    const before = openFds();
    const proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const img = await proxy.openImage(LATEST);
    const layer = fixtures.image.layers[1];
    const { stream } = await proxy.getBlob(img, layer.digest, layer.size);
    const reader = stream.getReader();
    await reader.read();
    process.kill(proxy.pid!, "SIGKILL");
    await assert.rejects(
      (async () => {
        for (;;) if ((await reader.read()).done) break;
      })(),
      (err: unknown) => {
        assert.ok(err instanceof ProxyExitedError, String(err));
        assert.equal(err.status.signal, "SIGKILL");
        return true;
      },
    );
    await assert.rejects(proxy.fetchManifest(img), ProxyExitedError);
    await assert.rejects(proxy.shutdown(), /signal SIGKILL/);
    await assertNoLeakedFds(before);
  });

  test(`skopeo killed with SIGKILL mid-request rejects the request with its exit ${at}`, async () => {
    const before = openFds();
    const proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    // Stopped, skopeo cannot answer before it dies: the reply to a local open can otherwise come
    // within the transport's first wait, before the signal lands.
    process.kill(proxy.pid!, "SIGSTOP");
    await waitFor(() => processStopped(proxy.pid!), 5000, "skopeo to stop");
    const pending = proxy.openImage(LATEST);
    process.kill(proxy.pid!, "SIGKILL");
    await assert.rejects(pending, (err: unknown) => {
      assert.ok(err instanceof ProxyExitedError, String(err));
      assert.match(err.message, /signal SIGKILL/);
      return true;
    });
    await proxy.shutdown().catch(() => {});
    await assertNoLeakedFds(before);
  });

  test(`decryption keys fail clearly on a skopeo whose proxy lacks --decryption-key ${at}`, async () => {
    const before = openFds();
    await assert.rejects(
      ImageProxy.spawn({ skopeoCmd: server.skopeoCmd, decryptionKeys: ["/nonexistent/key.pem"] }),
      (err: unknown) => {
        assert.ok(err instanceof ConfigurationError, String(err));
        assert.match(err.message, /decryptionKeys.*--decryption-key/);
        return true;
      },
    );
    await assertNoLeakedFds(before);
  });

  test(`auth data goes to skopeo as a memfd, never on its command line ${at}`, async () => {
    const secret = "c2VjcmV0LXVzZXI6aHVudGVyMg==";
    const authData = JSON.stringify({ auths: { "registry.invalid": { auth: secret } } });
    await withProxy(server, async (proxy) => {
      const cmdline = readProcFile(`/proc/${proxy.pid}/cmdline`);
      assert.ok(!cmdline.includes(secret));
      assert.match(cmdline, /--authfile\0\/proc\/self\/fd\/\d+/);
      const environ = readProcFile(`/proc/${proxy.pid}/environ`);
      assert.ok(!environ.includes(secret));
      await proxy.openImage(LATEST);
    }, { authData });
  });
}

test("a malformed reference is refused before it reaches skopeo", async () => {
  const server = SERVERS[0];
  await withProxy(server, async (proxy) => {
    for (
      const bad of [
        "nope",
        "docker:/missing-slash",
        "docker://host/UPPER",
        "oci:",
        "ftp://x",
        "docker://a:b@sha256:12",
      ]
    ) {
      await assert.rejects(proxy.openImage(bad), InvalidReferenceError, bad);
    }
  });
});

test("a missing skopeo fails with a SpawnError that says how to install it", async () => {
  const before = openFds();
  for (
    const skopeoCmd of [["/nonexistent/skopeo"], [
      "setpriv",
      "--pdeathsig",
      "SIGTERM",
      "--",
      "/nonexistent/skopeo",
    ]]
  ) {
    await assert.rejects(ImageProxy.spawn({ skopeoCmd }), (err: unknown) => {
      assert.ok(err instanceof SpawnError, String(err));
      assert.match(err.message, /apt-get install skopeo/);
      return true;
    });
  }
  await assertNoLeakedFds(before);
});

test("conflicting auth options are a ConfigurationError before anything starts", async () => {
  await assert.rejects(
    ImageProxy.spawn({ authfile: "/tmp/auth.json", authAnonymous: true, skopeoCmd: ["/nonexistent"] }),
    ConfigurationError,
  );
  await assert.rejects(
    ImageProxy.spawn({ authfile: "/tmp/auth.json", authData: "{}", skopeoCmd: ["/nonexistent"] }),
    /Conflicting authentication options/,
  );
});
