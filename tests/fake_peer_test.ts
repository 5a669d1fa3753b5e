// Protocol edge cases no real skopeo produces on demand: a scripted peer (tests/helpers/fake-skopeo.py)
// speaks the real wire format over the real adapter, then misbehaves. Each case checks the error type
// and that no fd leaked.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  BlobError,
  type ImageProxyConfig,
  ProtocolError,
  ProxyExitedError,
  ProxyTooOldError,
  RequestError,
  RequestTimeoutError,
  UnsupportedMethodError,
} from "../mod.ts";
import { ImageProxy } from "../mod.ts";
import { assertNoLeakedFds, openFds, processAlive, readAll, ROOT, waitFor } from "./helpers/env.ts";

const FAKE = ["python3", join(ROOT, "tests", "helpers", "fake-skopeo.py")];
const REF = "oci:/nonexistent/fake:latest";
const DIGEST = "sha256:" + "a".repeat(64);

function fake(scenario: string, env: Record<string, string> = {}): ImageProxyConfig {
  return { skopeoCmd: FAKE, env: { FAKE_SCENARIO: scenario, ...env } };
}

/** Spawns the fake, runs `body`, shuts down, and checks fds and the child. */
async function withFake(
  config: ImageProxyConfig,
  body: (proxy: ImageProxy) => Promise<void>,
): Promise<void> {
  const before = openFds();
  const proxy = await ImageProxy.spawn(config);
  try {
    await body(proxy);
  } finally {
    await proxy.shutdown().catch(() => {});
  }
  await waitFor(() => !processAlive(proxy.pid!), 5000, "the fake peer to exit");
  await assertNoLeakedFds(before);
}

test("a proxy older than protocol 0.2.3 is refused with ProxyTooOldError", async () => {
  const before = openFds();
  await assert.rejects(ImageProxy.spawn(fake("normal", { FAKE_VERSION: "0.2.1" })), (err: unknown) => {
    assert.ok(err instanceof ProxyTooOldError);
    assert.equal(err.found, "0.2.1");
    assert.match(err.message, /0\.2\.1.*too old.*0\.2\.3/);
    return true;
  });
  await assertNoLeakedFds(before);
});

test("an invalid version string in the Initialize reply is a ProtocolError", async () => {
  await assert.rejects(ImageProxy.spawn(fake("normal", { FAKE_VERSION: "banana" })), ProtocolError);
});

test("a proxy that exits before Initialize reports its status and stderr", async () => {
  const before = openFds();
  await assert.rejects(ImageProxy.spawn(fake("exit-at-start")), (err: unknown) => {
    assert.ok(err instanceof ProxyExitedError, String(err));
    assert.equal(err.status.code, 3);
    assert.match(err.stderrTail, /refusing to start/);
    assert.match(err.message, /exit code 3.*refusing to start/);
    return true;
  });
  await assertNoLeakedFds(before);
});

test("a reply that is not JSON is a ProtocolError", async () => {
  await withFake(fake("nonjson"), async (proxy) => {
    await assert.rejects(proxy.openImage(REF), (err: unknown) => {
      assert.ok(err instanceof ProtocolError);
      assert.match(err.message, /OpenImage is not valid JSON/);
      return true;
    });
  });
});

test("a reply value of the wrong type is a ProtocolError", async () => {
  await withFake(fake("wrongtype"), async (proxy) => {
    await assert.rejects(proxy.openImage(REF), /expected an integer, got "one"/);
  });
});

test("a reply with more fds than the method allows is a ProtocolError and every fd is closed", async () => {
  await withFake(fake("extrafds"), async (proxy) => {
    await assert.rejects(proxy.openImage(REF), (err: unknown) => {
      assert.ok(err instanceof ProtocolError);
      assert.match(err.message, /carried 2 file descriptors, expected 0/);
      return true;
    });
  });
});

test("a pipe reply without its fd is a ProtocolError", async () => {
  await withFake(fake("missingfd"), async (proxy) => {
    const img = await proxy.openImage(REF);
    await assert.rejects(proxy.fetchManifest(img), /carried 0 file descriptors, expected 1/);
  });
});

test("a pipe reply without a pipeid is a ProtocolError and its fd is closed", async () => {
  await withFake(fake("nopipeid"), async (proxy) => {
    const img = await proxy.openImage(REF);
    await assert.rejects(proxy.fetchManifest(img), /pipeid 0, expected a non-zero one/);
  });
});

test("an oversized reply is a ProtocolError, not a silent truncation", async () => {
  await withFake(fake("oversized"), async (proxy) => {
    await assert.rejects(proxy.openImage(REF), (err: unknown) => {
      assert.ok(err instanceof ProtocolError, String(err));
      assert.match(err.message, /larger than/);
      return true;
    });
  });
});

test("a 400-layer GetLayerInfo reply larger than 32 KiB is read whole", async () => {
  await withFake(fake("biglayers", { FAKE_VERSION: "0.2.5" }), async (proxy) => {
    const img = await proxy.openImage(REF);
    const layers = await proxy.getLayerInfo(img);
    assert.equal(layers?.length, 400);
    assert.equal(layers?.[399].size, 1399);
  });
});

test("a malformed GetLayerInfo entry is a ProtocolError", async () => {
  await withFake(fake("badlayers", { FAKE_VERSION: "0.2.5" }), async (proxy) => {
    const img = await proxy.openImage(REF);
    await assert.rejects(proxy.getLayerInfo(img), /Layer info entry 0 is malformed/);
  });
});

test("methods newer than the proxy fail with the version they need, without a round trip", async () => {
  await withFake(fake("normal", { FAKE_VERSION: "0.2.5" }), async (proxy) => {
    assert.equal(proxy.protocolVersion, "0.2.5");
    const img = await proxy.openImage(REF);
    await assert.rejects(proxy.getRawBlob(img, DIGEST), (err: unknown) => {
      assert.ok(err instanceof UnsupportedMethodError);
      assert.equal(err.protocolVersion, "0.2.5");
      assert.equal(err.requiredVersion, "0.2.8");
      return true;
    });
  });
});

test("a failed reply becomes a RequestError with the server's message and code", async () => {
  await withFake(fake("failed"), async (proxy) => {
    await assert.rejects(proxy.openImage(REF), (err: unknown) => {
      assert.ok(err instanceof RequestError);
      assert.equal(err.serverMessage, "no such image");
      assert.equal(err.errorCode, "other");
      assert.equal(err.retryable, false);
      return true;
    });
  });
});

test("a slow request leaves timers running", async () => {
  await withFake(fake("slow", { FAKE_DELAY: "1.0" }), async (proxy) => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 20);
    const started = Date.now();
    try {
      await proxy.openImage(REF);
    } finally {
      clearInterval(timer);
    }
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 900, `the request took ${elapsed} ms`);
    // A blocked event loop would give 0 or 1 ticks; 20 ms ticks over ~1 s give about 50.
    assert.ok(ticks >= 20, `only ${ticks} timer ticks during a ${elapsed} ms request`);
  });
});

test("a peer that dies mid-request rejects the request promptly with its status and stderr", async () => {
  await withFake(fake("die-mid-request"), async (proxy) => {
    const started = Date.now();
    await assert.rejects(proxy.openImage(REF), (err: unknown) => {
      assert.ok(err instanceof ProxyExitedError, String(err));
      assert.equal(err.status.code, 7);
      assert.match(err.stderrTail, /dying in the middle of OpenImage/);
      return true;
    });
    assert.ok(Date.now() - started < 3000);
    await assert.rejects(proxy.openImage(REF), ProxyExitedError);
  });
});

test("a hung peer killed with SIGKILL rejects the pending request", async () => {
  await withFake(fake("hang"), async (proxy) => {
    const pending = proxy.openImage(REF);
    await new Promise((r) => setTimeout(r, 200));
    process.kill(proxy.pid!, "SIGKILL");
    await assert.rejects(pending, (err: unknown) => {
      assert.ok(err instanceof ProxyExitedError, String(err));
      assert.equal(err.status.signal, "SIGKILL");
      return true;
    });
  });
});

test("a peer that dies mid-blob errors the stream with its status", async () => {
  await withFake(fake("die-mid-blob"), async (proxy) => {
    const img = await proxy.openImage(REF);
    const { stream } = await proxy.getBlob(img, DIGEST, 100_000);
    await assert.rejects(
      (async () => {
        for await (const _ of stream) { /* drain */ }
      })(),
      (err: unknown) => {
        assert.ok(err instanceof ProxyExitedError, String(err));
        assert.equal(err.status.code, 9);
        return true;
      },
    );
  });
});

test("a blob with more bytes than declared errors instead of passing them on", async () => {
  await withFake(fake("normal", { FAKE_BLOB_BYTES: "150000" }), async (proxy) => {
    const img = await proxy.openImage(REF);
    const { stream } = await proxy.getBlob(img, DIGEST, 100_000);
    let received = 0;
    await assert.rejects(
      (async () => {
        for await (const chunk of stream) received += chunk.length;
      })(),
      (err: unknown) => {
        assert.ok(err instanceof BlobError, String(err));
        assert.match(err.message, /more than the 100000 bytes/);
        return true;
      },
    );
    assert.ok(received <= 100_000, `passed on ${received} bytes`);
  });
});

test("a blob of exactly the declared size completes once FinishPipe succeeds", async () => {
  await withFake(fake("normal"), async (proxy) => {
    const img = await proxy.openImage(REF);
    const { stream } = await proxy.getBlob(img, DIGEST, 300_000);
    let received = 0;
    for await (const chunk of stream) received += chunk.length;
    assert.equal(received, 300_000);
  });
});

const RAW_BYTES = 200_000;
function rawContent(n = RAW_BYTES): Uint8Array {
  const data = new Uint8Array(n);
  for (let i = 0; i < n; i++) data[i] = (i * 7) & 0xff;
  return data;
}
const RAW_DIGEST = "sha256:" + createHash("sha256").update(rawContent()).digest("hex");

const callLogDirs: string[] = [];
after(() => {
  for (const dir of callLogDirs) rmSync(dir, { recursive: true, force: true });
});

function callLog(): { path: string; count: (method: string) => number } {
  const dir = mkdtempSync(join(tmpdir(), "cip-fake-"));
  callLogDirs.push(dir);
  const path = join(dir, "calls.log");
  return {
    path,
    count: (method) =>
      existsSync(path) ? readFileSync(path, "utf8").split("\n").filter((l) => l === method).length : 0,
  };
}

test("a blob that stalls mid-way errors with a retryable BlobError after the idle timeout", async () => {
  await withFake({ ...fake("stall"), blobIdleTimeoutMs: 300 }, async (proxy) => {
    const img = await proxy.openImage(REF);
    const { stream } = await proxy.getBlob(img, DIGEST, 100_000);
    const started = Date.now();
    let received = 0;
    await assert.rejects(
      (async () => {
        for await (const chunk of stream) received += chunk.length;
      })(),
      (err: unknown) => {
        assert.ok(err instanceof BlobError, String(err));
        assert.equal(err.retryable, true);
        assert.match(err.message, /stalled: no data for 300 ms after 1000 of 100000 bytes/);
        return true;
      },
    );
    assert.equal(received, 1000);
    assert.ok(Date.now() - started < 3000);
    // The proxy is still usable: the stalled pipe was left to the server, not FinishPipe'd.
    await proxy.openImage(REF);
  });
});

test("a per-blob idleTimeoutMs overrides the proxy's", async () => {
  await withFake({ ...fake("stall"), blobIdleTimeoutMs: 60_000 }, async (proxy) => {
    const img = await proxy.openImage(REF);
    const { stream } = await proxy.getBlob(img, DIGEST, 100_000, { idleTimeoutMs: 200 });
    await assert.rejects(readAll(stream), /stalled: no data for 200 ms/);
  });
});

test("a request without an answer fails with RequestTimeoutError and stops the proxy", async () => {
  const before = openFds();
  const proxy = await ImageProxy.spawn({ ...fake("hang"), requestTimeoutMs: 400 });
  const started = Date.now();
  await assert.rejects(proxy.openImage(REF), (err: unknown) => {
    assert.ok(err instanceof RequestTimeoutError, String(err));
    assert.equal(err.method, "OpenImage");
    assert.equal(err.timeoutMs, 400);
    return true;
  });
  assert.ok(Date.now() - started < 4000, "the timeout fired promptly");
  await assert.rejects(proxy.openImage(REF), RequestTimeoutError);
  await proxy.shutdown().catch(() => {});
  await waitFor(() => !processAlive(proxy.pid!), 5000, "the fake peer to be stopped");
  await assertNoLeakedFds(before);
});

test("openImage retries failures the proxy marks retryable, with backoff, when asked to", async () => {
  const log = callLog();
  const config = { ...fake("flaky-open", { FAKE_LOG: log.path, FAKE_FAILURES: "2" }) };
  await withFake({ ...config, retry: { attempts: 3, initialDelayMs: 10 } }, async (proxy) => {
    await proxy.openImage(REF);
    assert.equal(log.count("OpenImage"), 3);
  });
  const noRetry = callLog();
  await withFake(fake("flaky-open", { FAKE_LOG: noRetry.path }), async (proxy) => {
    await assert.rejects(proxy.openImage(REF), (err: unknown) => {
      assert.ok(err instanceof RequestError);
      assert.equal(err.retryable, true);
      assert.match(err.message, /503/);
      return true;
    });
    assert.equal(noRetry.count("OpenImage"), 1, "no retry without a policy");
  });
});

test("getRawBlob verifies content on the client and completes", async () => {
  await withFake(fake("normal"), async (proxy) => {
    const img = await proxy.openImage(REF);
    const blob = await proxy.getRawBlob(img, RAW_DIGEST);
    assert.equal(blob.size, RAW_BYTES);
    assert.deepEqual(await readAll(blob.stream), rawContent());
  });
});

test("getRawBlob resumes a copy that failed with a retryable code, and the digest still holds", async () => {
  const log = callLog();
  await withFake(
    {
      ...fake("normal", { FAKE_RAW: "flaky", FAKE_LOG: log.path }),
      retry: { attempts: 2, initialDelayMs: 10 },
    },
    async (proxy) => {
      const img = await proxy.openImage(REF);
      const { stream } = await proxy.getRawBlob(img, RAW_DIGEST);
      assert.deepEqual(await readAll(stream), rawContent());
      assert.equal(log.count("GetRawBlob"), 2);
    },
  );
});

test("getRawBlob without a retry policy surfaces the retryable error", async () => {
  await withFake(fake("normal", { FAKE_RAW: "flaky" }), async (proxy) => {
    const img = await proxy.openImage(REF);
    const { stream } = await proxy.getRawBlob(img, RAW_DIGEST);
    await assert.rejects(readAll(stream), (err: unknown) => {
      assert.ok(err instanceof BlobError, String(err));
      assert.equal(err.retryable, true);
      assert.match(err.message, /connection reset by peer/);
      return true;
    });
  });
});

test("getRawBlob resumes after a stall under the retry policy", async () => {
  await withFake(
    {
      ...fake("normal", { FAKE_RAW: "stall" }),
      blobIdleTimeoutMs: 300,
      retry: { attempts: 2, initialDelayMs: 10 },
    },
    async (proxy) => {
      const img = await proxy.openImage(REF);
      const { stream } = await proxy.getRawBlob(img, RAW_DIGEST);
      assert.deepEqual(await readAll(stream), rawContent());
    },
  );
});

test("a digest mismatch is never retried", async () => {
  const log = callLog();
  await withFake(
    {
      ...fake("normal", { FAKE_RAW: "corrupt", FAKE_LOG: log.path }),
      retry: { attempts: 5, initialDelayMs: 10 },
    },
    async (proxy) => {
      const img = await proxy.openImage(REF);
      const { stream } = await proxy.getRawBlob(img, RAW_DIGEST);
      await assert.rejects(readAll(stream), (err: unknown) => {
        assert.ok(err instanceof BlobError, String(err));
        assert.equal(err.retryable, false);
        assert.match(err.message, /is corrupted/);
        return true;
      });
      assert.equal(log.count("GetRawBlob"), 1);
    },
  );
});
