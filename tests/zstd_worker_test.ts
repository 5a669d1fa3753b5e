// Deno decodes zstd in a worker (src/image/zstd.ts): its event loop fds must not pile up, layer after layer.
import { test } from "node:test";
import assert from "node:assert/strict";
import { zstdCompressSync } from "node:zlib";
import { readdirSync, readlinkSync } from "node:fs";
import { decompress } from "../src/image/decompress.ts";
import { RUNTIME } from "./helpers/env.ts";

/** The eventfd and epoll fds of this process (Deno reads /proc/self through node:fs with --allow-read). */
function eventLoopFds(): number {
  let n = 0;
  for (const name of readdirSync("/proc/self/fd")) {
    try {
      if (/^anon_inode:\[(eventfd|eventpoll)\]$/.test(readlinkSync(`/proc/self/fd/${name}`))) n++;
    } catch { /* the fd readdir used */ }
  }
  return n;
}

test("decoding zstd layer after layer leaves at most one worker's event loop fds behind", {
  skip: RUNTIME !== "deno" && "only Deno decodes zstd in a worker",
}, async () => {
  const layer = new Uint8Array(zstdCompressSync(new Uint8Array(4 << 20).fill(7)));
  const decodeOnce = async () => {
    const { stream } = await decompress(new Blob([layer]).stream());
    let n = 0;
    for await (const chunk of stream) n += chunk.length;
    assert.equal(n, 4 << 20);
  };
  const before = eventLoopFds();
  for (let i = 0; i < 6; i++) await decodeOnce();
  // A worker's loop closes a moment after it ends: wait for that, at most 2 s.
  const deadline = Date.now() + 2000;
  let extra = eventLoopFds() - before;
  while (extra > 2 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
    extra = eventLoopFds() - before;
  }
  assert.ok(extra <= 2, `${extra} event loop fds more than before`);
});
