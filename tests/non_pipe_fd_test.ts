// A hostile or broken peer may send any kind of fd where the protocol allows only pipes: a regular
// file, a character device that never ends (/dev/zero) or always ends (/dev/null), a socket, a
// directory. Each must be refused with a ProtocolError and closed at once, whichever reply carried it,
// without holding the event loop, and the proxy must stay usable. The scripted peer
// (tests/helpers/fake-skopeo.py, scenario "notpipe") sends the fd on the first call of one method and
// serves the later ones normally.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ImageProxy, ProtocolError } from "../mod.ts";
import { assertNoLeakedFds, openFds, processAlive, readAll, ROOT, waitFor, within } from "./helpers/env.ts";

const FAKE = ["python3", join(ROOT, "tests", "helpers", "fake-skopeo.py")];
const REF = "oci:/nonexistent/fake:latest";
const DIGEST = "sha256:" + "a".repeat(64);
const BLOB_BYTES = 100_000;
const RAW_BYTES = 200_000;
const RAW_CONTENT = new Uint8Array(RAW_BYTES).map((_, i) => (i * 7) & 0xff);
const RAW_DIGEST = "sha256:" + createHash("sha256").update(RAW_CONTENT).digest("hex");

/** The kinds of fd the peer sends in place of a pipe. */
const KINDS = [
  { kind: "file", name: "a regular file" },
  { kind: "zero", name: "/dev/zero" },
  { kind: "null", name: "/dev/null" },
  { kind: "socket", name: "a socket" },
  { kind: "dir", name: "a directory" },
];

/** Where the fd goes, and a call that receives it, then one that must work afterwards. */
interface Place {
  name: string;
  env: Record<string, string>;
  /** Receives the foreign fd (and reads what it was given, as a caller would). */
  hostile(proxy: ImageProxy): Promise<unknown>;
  /** The same call again, served normally. */
  normal(proxy: ImageProxy): Promise<void>;
}

async function readBlob(proxy: ImageProxy): Promise<Uint8Array> {
  const img = await proxy.openImage(REF);
  return await readAll((await proxy.getBlob(img, DIGEST, BLOB_BYTES)).stream);
}

async function saveBlob(proxy: ImageProxy): Promise<number> {
  const img = await proxy.openImage(REF);
  const dir = mkdtempSync(join(tmpdir(), "cip-notpipe-save-"));
  try {
    return await proxy.saveBlob(img, DIGEST, BLOB_BYTES, join(dir, "blob"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function readRawBlob(proxy: ImageProxy): Promise<Uint8Array> {
  const img = await proxy.openImage(REF);
  return await readAll((await proxy.getRawBlob(img, RAW_DIGEST)).stream);
}

const PLACES: Place[] = [
  {
    name: "the GetBlob pipe",
    env: { FAKE_FD_ON: "GetBlob" },
    hostile: readBlob,
    normal: async (proxy) => assert.equal((await readBlob(proxy)).length, BLOB_BYTES),
  },
  {
    name: "the GetBlob pipe of saveBlob",
    env: { FAKE_FD_ON: "GetBlob" },
    hostile: saveBlob,
    normal: async (proxy) => assert.equal(await saveBlob(proxy), BLOB_BYTES),
  },
  {
    name: "GetRawBlob's data fd",
    env: { FAKE_FD_ON: "GetRawBlob", FAKE_FD_SLOT: "0" },
    hostile: readRawBlob,
    normal: async (proxy) => assert.deepEqual(await readRawBlob(proxy), RAW_CONTENT),
  },
  {
    name: "GetRawBlob's error fd",
    env: { FAKE_FD_ON: "GetRawBlob", FAKE_FD_SLOT: "1" },
    hostile: readRawBlob,
    normal: async (proxy) => assert.deepEqual(await readRawBlob(proxy), RAW_CONTENT),
  },
  {
    name: "a reply that carries no fd (OpenImage)",
    env: { FAKE_FD_ON: "OpenImage" },
    hostile: (proxy) => proxy.openImage(REF),
    normal: async (proxy) => void await proxy.openImage(REF),
  },
];

/** The fds of this process pointing to `path` (or to it once deleted) that were not open `before`. */
function newFdsTo(before: Map<number, string>, path: string): string[] {
  return [...openFds()].filter(([fd, target]) =>
    before.get(fd) !== target && (target === path || target === `${path} (deleted)`)
  ).map(([fd, target]) => `${fd} -> ${target}`);
}

for (const place of PLACES) {
  for (const { kind, name } of KINDS) {
    test(`${name} as ${place.name} is refused with a ProtocolError and closed, and the proxy stays usable`, async () => {
      const scratch = mkdtempSync(join(tmpdir(), "cip-notpipe-test-"));
      const pathFile = join(scratch, "path");
      const before = openFds();
      // A held event loop stops this counter: it must keep moving through the whole exchange.
      let ticks = 0;
      const timer = setInterval(() => ticks++, 5);
      const proxy = await ImageProxy.spawn({
        skopeoCmd: FAKE,
        env: { FAKE_SCENARIO: "notpipe", FAKE_FD_KIND: kind, FAKE_FD_PATH: pathFile, ...place.env },
        blobIdleTimeoutMs: 5000,
      });
      try {
        const started = ticks;
        await within(
          assert.rejects(place.hostile(proxy), (err: unknown) => {
            assert.ok(err instanceof ProtocolError, `a ProtocolError, not ${err}`);
            assert.match(err.message, /not a pipe/);
            return true;
          }),
          10_000,
          `the reply carrying ${name}`,
        );
        const path = readFileSync(pathFile, "utf8");
        if (path) assert.deepEqual(newFdsTo(before, path), [], `${name} is closed at once`);
        await within(place.normal(proxy), 10_000, "the next call, served normally");
        await waitFor(() => ticks >= started + 3, 2000, "timers to keep firing");
      } finally {
        clearInterval(timer);
        await proxy.shutdown().catch(() => {});
        rmSync(scratch, { recursive: true, force: true });
      }
      await waitFor(() => !processAlive(proxy.pid!), 5000, "the fake peer to exit");
      await assertNoLeakedFds(before);
    });
  }
}

test("/dev/zero as the pipe of a 16 GiB blob is refused at once, without holding the event loop", async () => {
  const before = openFds();
  const proxy = await ImageProxy.spawn({
    skopeoCmd: FAKE,
    env: { FAKE_SCENARIO: "notpipe", FAKE_FD_KIND: "zero", FAKE_FD_ON: "GetBlob" },
  });
  // The longest time between two timer callbacks: a reader that holds the event loop shows as a gap.
  let last = performance.now();
  let longest = 0;
  const tick = () => {
    const now = performance.now();
    longest = Math.max(longest, now - last);
    last = now;
  };
  const timer = setInterval(tick, 5);
  try {
    const img = await proxy.openImage(REF);
    const error = await (async () => {
      for await (const _ of (await proxy.getBlob(img, DIGEST, 16 * 2 ** 30)).stream) { /* drain */ }
    })().then(() => undefined, (err: unknown) => err);
    await new Promise((resolve) => setTimeout(resolve, 20));
    tick();
    assert.ok(longest < 500, `timers stopped for ${Math.round(longest)} ms`);
    assert.ok(error instanceof ProtocolError, `a ProtocolError, not ${error}`);
  } finally {
    clearInterval(timer);
    await proxy.shutdown().catch(() => {});
  }
  await waitFor(() => !processAlive(proxy.pid!), 5000, "the fake peer to exit");
  await assertNoLeakedFds(before);
});
