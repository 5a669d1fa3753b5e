// A blob that goes on past its declared size, from a scripted peer (tests/helpers/fake-skopeo.py) and
// from a registry stand-in that sends the declared bytes, then zeros forever, through both real skopeo
// servers: the blob fails with a BlobError in bounded time, no more than a bounded excess is read or
// written, every promise settles (nothing goes unhandled, an abort while FinishPipe is pending
// included), the proxy serves the next request, and no fd or child is left behind.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlobError, ImageProxy, type ImageProxyConfig } from "../mod.ts";
import { BLOB_PIPE_SIZE, MAX_EXCESS_READ } from "../src/blob-stream.ts";
import { assertNoLeakedFds, openFds, processAlive, ROOT, SERVERS, waitFor, within } from "./helpers/env.ts";
import { withProxy } from "./helpers/proxy.ts";
import { startStandInRegistry } from "./helpers/concurrency-registry.ts";
import { childPids } from "./helpers/concurrency-procs.ts";
import { cliCommand, tempDir } from "./helpers/cli-helpers.ts";

const FAKE = ["python3", join(ROOT, "tests", "helpers", "fake-skopeo.py")];
const REF = "oci:/nonexistent/fake:latest";
const DIGEST = "sha256:" + "a".repeat(64);
const SIZE = 65_536;
/** Failing a blob that never ends must take this long at most. */
const BOUNDED_MS = 10_000;

const scratchDirs: string[] = [];
after(() => {
  for (const dir of scratchDirs) rmSync(dir, { recursive: true, force: true });
});

function scratch(): string {
  const dir = mkdtempSync(join(tmpdir(), "cip-past-size-"));
  scratchDirs.push(dir);
  return dir;
}

/** A fake peer whose GetBlob sends the declared bytes, then zeros forever; `log` gets what it wrote. */
function endless(log: string, env: Record<string, string> = {}): ImageProxyConfig {
  return { skopeoCmd: FAKE, env: { FAKE_SCENARIO: "endless", FAKE_LOG: log, ...env } };
}

/** The byte counts the fake's writers logged once our end was closed. */
function written(log: string): number[] {
  if (!existsSync(log)) return [];
  return readFileSync(log, "utf8").split("\n").flatMap((line) => {
    const match = /^written (\d+)$/.exec(line);
    return match ? [Number(match[1])] : [];
  });
}

/** Spawns the fake, runs `body`, shuts down, and checks fds and the child. */
async function withFake(config: ImageProxyConfig, body: (proxy: ImageProxy) => Promise<void>): Promise<void> {
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

/** Runs `body` and fails if any promise rejection went unhandled meanwhile (or just after). */
async function withoutUnhandledRejections(body: () => Promise<void>): Promise<void> {
  const unhandled: unknown[] = [];
  const record = (reason: unknown) => unhandled.push(reason);
  process.on("unhandledRejection", record);
  try {
    await body();
    await new Promise((resolve) => setTimeout(resolve, 200));
  } finally {
    process.off("unhandledRejection", record);
  }
  assert.deepEqual(unhandled.map(String), [], "no promise rejection went unhandled");
}

function isPastSize(size: number) {
  return (err: unknown) => {
    assert.ok(err instanceof BlobError, String(err));
    assert.equal(err.retryable, false);
    assert.match(err.message, new RegExp(`has more than the ${size} bytes expected: more data arrived`));
    return true;
  };
}

for (const sizeUnknown of [false, true]) {
  const how = sizeUnknown ? "of unknown size (-1)" : "of known size";
  const env: Record<string, string> = sizeUnknown ? { FAKE_SIZE_UNKNOWN: "1" } : {};

  test(`getBlob of a blob ${how} that goes on forever past its size fails in bounded time`, async () => {
    const log = join(scratch(), "fake.log");
    await withoutUnhandledRejections(() =>
      withFake(endless(log, env), async (proxy) => {
        const img = await proxy.openImage(REF);
        const { stream } = await proxy.getBlob(img, DIGEST, SIZE);
        const started = Date.now();
        let received = 0;
        await assert.rejects(
          within(
            (async () => {
              for await (const chunk of stream) received += chunk.length;
            })(),
            BOUNDED_MS,
            "the blob that never ends",
          ),
          isPastSize(SIZE),
        );
        assert.ok(Date.now() - started < BOUNDED_MS);
        // Never more than the declared bytes (a chunk that crosses the size is not passed on).
        assert.ok(received <= SIZE, `passed on ${received} bytes`);
        // The proxy serves the next request: FinishPipe was settled by the writer's EPIPE.
        await within(proxy.openImage(REF), BOUNDED_MS, "the next request");
        const [total] = written(log);
        // What the writer got rid of: what we read, plus what a full pipe holds.
        assert.ok(total <= SIZE + MAX_EXCESS_READ + BLOB_PIPE_SIZE, `the writer wrote ${total} bytes`);
      })
    );
  });

  test(`saveBlob of a blob ${how} that goes on forever past its size never writes past it`, async () => {
    const dir = scratch();
    const log = join(dir, "fake.log");
    try {
      await withoutUnhandledRejections(() =>
        withFake(endless(log, env), async (proxy) => {
          const img = await proxy.openImage(REF);
          const path = join(dir, "blob");
          await assert.rejects(
            within(
              proxy.saveBlob(img, DIGEST, SIZE, path),
              BOUNDED_MS,
              "saveBlob of the blob that never ends",
            ),
            isPastSize(SIZE),
          );
          const saved = statSync(path).size;
          assert.ok(saved >= SIZE && saved <= SIZE + 1, `the file has ${saved} bytes`);
          await within(proxy.openImage(REF), BOUNDED_MS, "the next request");
          const [total] = written(log);
          assert.ok(total <= SIZE + 1 + BLOB_PIPE_SIZE, `the writer wrote ${total} bytes`);
        })
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

// Known size: the proxy's answer bounds the stream. Unknown size (a registry without Content-Length makes
// skopeo answer -1): the size the caller expects does.
for (
  const { name, env, options } of [
    {
      name: "getRawBlob of a blob of known size that goes on forever fails in bounded time",
      env: {},
      options: {},
    },
    {
      name: "getRawBlob of a blob of unknown size is bounded by the size the caller expects",
      env: { FAKE_SIZE_UNKNOWN: "1" },
      options: { size: SIZE },
    },
  ]
) {
  test(name, async () => {
    const log = join(scratch(), "fake.log");
    await withoutUnhandledRejections(() =>
      withFake(endless(log, { FAKE_RAW_BYTES: String(SIZE), ...env }), async (proxy) => {
        const img = await proxy.openImage(REF);
        const { size, stream } = await proxy.getRawBlob(img, DIGEST, options);
        assert.equal(size, SIZE);
        let received = 0;
        await assert.rejects(
          within(
            (async () => {
              for await (const chunk of stream) received += chunk.length;
            })(),
            BOUNDED_MS,
            "the raw blob that never ends",
          ),
          (err: unknown) => {
            assert.ok(err instanceof BlobError, String(err));
            assert.equal(err.retryable, false);
            assert.match(err.message, new RegExp(`more than the ${SIZE} bytes`));
            return true;
          },
        );
        assert.ok(received <= SIZE);
        await within(proxy.openImage(REF), BOUNDED_MS, "the next request");
        await waitFor(() => written(log).length === 1, BOUNDED_MS, "the raw writer to fail with EPIPE");
        const [total] = written(log);
        assert.ok(total <= SIZE + MAX_EXCESS_READ + BLOB_PIPE_SIZE, `the writer wrote ${total} bytes`);
      })
    );
  });
}

test("a blob whose source stops right after its declared bytes errors after the idle timeout", async () => {
  const log = join(scratch(), "fake.log");
  await withoutUnhandledRejections(() =>
    withFake({ ...endless(log, { FAKE_HOLD: "2" }), blobIdleTimeoutMs: 300 }, async (proxy) => {
      const img = await proxy.openImage(REF);
      const { stream } = await proxy.getBlob(img, DIGEST, SIZE);
      const started = Date.now();
      await assert.rejects(
        within(
          (async () => {
            for await (const _ of stream) { /* drain */ }
          })(),
          BOUNDED_MS,
          "the blob whose source stopped",
        ),
        (err: unknown) => {
          assert.ok(err instanceof BlobError, String(err));
          assert.equal(err.retryable, true);
          assert.match(err.message, new RegExp(`stalled: no data for 300 ms after ${SIZE} of ${SIZE} bytes`));
          return true;
        },
      );
      assert.ok(Date.now() - started < 1900, "the stall was noticed before the source went on");
      // Once the source goes on, its writer meets our closed end and FinishPipe returns.
      await within(proxy.openImage(REF), BOUNDED_MS, "the next request");
    })
  );
});

// The writer holds the pipe for FAKE_HOLD seconds after the declared bytes, so FinishPipe is pending
// (the server waits for its writer) when the signal aborts.
for (const kind of ["getBlob", "saveBlob"] as const) {
  test(`${kind} aborted while FinishPipe is pending settles everything, with nothing unhandled`, async () => {
    const dir = scratch();
    const log = join(dir, "fake.log");
    try {
      await withoutUnhandledRejections(() =>
        withFake(endless(log, { FAKE_HOLD: "1.5" }), async (proxy) => {
          const img = await proxy.openImage(REF);
          const controller = new AbortController();
          const reason = new Error("enough");
          let received = 0;
          const counted = (n: number) => {
            received += n;
            // Once every byte is in, the stream waits on FinishPipe: abort a moment later.
            if (received === SIZE) setTimeout(() => controller.abort(reason), 300);
          };
          const fetching = kind === "getBlob"
            ? proxy.getBlob(img, DIGEST, SIZE, { signal: controller.signal }).then(async ({ stream }) => {
              for await (const chunk of stream) counted(chunk.length);
            })
            : proxy.saveBlob(img, DIGEST, SIZE, join(dir, "blob"), {
              signal: controller.signal,
              onProgress: counted,
            }).then(() => {});
          await assert.rejects(within(fetching, BOUNDED_MS, `the aborted ${kind}`), (err) => err === reason);
          assert.equal(received, SIZE);
          // The writer meets our closed end once its hold is over; FinishPipe then returns its error.
          await within(proxy.openImage(REF), BOUNDED_MS, "the next request");
        })
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

/** The last lines of a CLI run's stderr, checked against the error contract: one `error:` line. */
function assertOneErrorLine(stderr: string, pattern: RegExp): void {
  const lines = stderr.split("\n").filter((line) => line.trim() !== "");
  assert.equal(lines.length, 1, `exactly one line on stderr, got:\n${stderr}`);
  assert.match(lines[0], /^error: /);
  assert.match(lines[0], pattern);
}

/**
 * Runs the CLI in a child process (this one's event loop stays free to serve the registry stand-in),
 * sends it SIGTERM after `sigtermAfterMs`, and resolves with its status and stderr.
 */
function runCliAsync(
  args: string[],
  sigtermAfterMs = 60_000,
): Promise<{ status: number | null; stderr: string }> {
  const [command, ...prefix] = cliCommand();
  const child = spawn(command, [...prefix, ...args], {
    cwd: ROOT,
    env: { ...process.env, NO_COLOR: "1" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr!.on("data", (chunk) => stderr += chunk.toString());
  // process.kill, not child.kill: after child.kill, Deno reports the signal instead of the exit code.
  const timer = setTimeout(() => process.kill(child.pid!, "SIGTERM"), sigtermAfterMs);
  const killer = setTimeout(() => child.kill("SIGKILL"), sigtermAfterMs + 30_000);
  return new Promise((resolve) => {
    child.on("close", (status) => {
      clearTimeout(timer);
      clearTimeout(killer);
      resolve({ status, stderr });
    });
  });
}

for (const server of SERVERS) {
  const at = `(${server.name})`;
  const options = { insecureSkipTlsVerification: true, blobIdleTimeoutMs: 5000 };

  test(`getBlob and saveBlob from a registry that sends zeros forever past the size fail in bounded time ${at}`, async () => {
    const registry = await startStandInRegistry();
    const dir = scratch();
    try {
      await withoutUnhandledRejections(() =>
        withProxy(server, async (proxy) => {
          const img = await proxy.openImage(registry.ref("endless"));
          const { layer, config } = registry;
          const { stream } = await proxy.getBlob(img, layer.digest, layer.size);
          const started = Date.now();
          let received = 0;
          await assert.rejects(
            within(
              (async () => {
                for await (const chunk of stream) received += chunk.length;
              })(),
              BOUNDED_MS,
              "getBlob of the endless layer",
            ),
            isPastSize(layer.size),
          );
          assert.ok(Date.now() - started < BOUNDED_MS);
          assert.ok(received <= layer.size);
          const path = join(dir, "layer");
          await assert.rejects(
            within(
              proxy.saveBlob(img, layer.digest, layer.size, path),
              BOUNDED_MS,
              "saveBlob of the endless layer",
            ),
            isPastSize(layer.size),
          );
          const saved = statSync(path).size;
          assert.ok(saved <= layer.size + 1, `the file has ${saved} bytes`);
          // The proxy still serves: the config blob comes whole, saved and streamed.
          assert.equal(
            await within(
              proxy.saveBlob(img, config.digest, config.size, join(dir, "config")),
              BOUNDED_MS,
              "config",
            ),
            config.size,
          );
          assert.deepEqual(new Uint8Array(readFileSync(join(dir, "config"))), config.data);
        }, options)
      );
    } finally {
      await registry.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test(`the CLI's blob and fetch --output fail with one error line on a blob that never ends ${at}`, async () => {
    const registry = await startStandInRegistry();
    const dir = tempDir("past-size");
    const children = childPids();
    try {
      const skopeo = ["--skopeo", server.skopeoCmd.join(" "), "--tls-verify=false"];
      const ref = registry.ref("endless");
      const { layer } = registry;
      for (const args of [["blob", ref, layer.digest, String(layer.size)], ["fetch", ref, "--output", dir]]) {
        const started = Date.now();
        const result = await runCliAsync([...skopeo, ...args]);
        assert.equal(result.status, 1, `${args[0]}: ${result.stderr}`);
        assertOneErrorLine(result.stderr, new RegExp(`more than the ${layer.size} bytes expected`));
        assert.ok(Date.now() - started < 30_000, `${args[0]} took ${Date.now() - started} ms`);
      }
      assert.deepEqual(childPids(), children);
    } finally {
      await registry.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test(`SIGTERM during fetch --output ends the CLI with one error line, nothing unhandled ${at}`, async () => {
    const registry = await startStandInRegistry();
    const dir = tempDir("past-size-term");
    try {
      const skopeo = ["--skopeo", server.skopeoCmd.join(" "), "--tls-verify=false"];
      // stall-unsized: skopeo cannot tell the size, so FinishPipe is pending while the layer stalls;
      // endless: the blob that never ends, which used to be drained while FinishPipe was pending.
      for (const repository of ["stall-unsized", "endless"] as const) {
        const started = Date.now();
        const result = await runCliAsync(
          [...skopeo, "fetch", registry.ref(repository), "--output", join(dir, repository)],
          1500,
        );
        assert.ok(Date.now() - started < 20_000, `${repository}: the CLI ended in bounded time`);
        assert.doesNotMatch(result.stderr, /uncaught|unhandled/i);
        assert.ok(
          result.status === 130 || result.status === 1,
          `${repository}: ${result.status} ${result.stderr}`,
        );
        assertOneErrorLine(result.stderr, /Interrupted by SIGTERM|more than the \d+ bytes expected/);
      }
    } finally {
      await registry.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
