// Deno decodes zstd in a worker (src/image/zstd.ts): its event loop fds must not pile up, layer after layer.
import { test } from "node:test";
import assert from "node:assert/strict";
import { decompress } from "../src/image/decompress.ts";
import { openFds, RUNTIME } from "./helpers/env.ts";
import { requireTool, zstd } from "./helpers/cli-helpers.ts";

/** The eventfd and epoll fds of this process (Deno guards /proc/self: `openFds` reads it through FFI). */
function eventLoopFds(): number {
  return [...openFds().values()].filter((target) => /^anon_inode:\[(eventfd|eventpoll)\]$/.test(target))
    .length;
}

test("decoding zstd layer after layer leaves at most one worker's event loop fds behind", {
  skip: RUNTIME !== "deno" && "only Deno decodes zstd in a worker",
}, async (t) => {
  const missing = requireTool("zstd");
  if (missing) return t.skip(missing);
  const layer = new Uint8Array(zstd(new Uint8Array(4 << 20).fill(7)));
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
