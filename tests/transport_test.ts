// The transport conformance suite: the rules every runtime adapter's Transport keeps, checked on the
// adapter itself (not through ImageProxy) against a scripted peer (tests/helpers/transport-peer.py)
// started as the "skopeo" command. `deno test` runs it on the Deno adapter, `bun test` on the Bun one.
//
// A new adapter is done when this suite passes on it under its runtime: add it to ADAPTERS below
// (one line), run the suite there, and check that each rule fails when broken in it on purpose.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ProtocolError, type Transport, type TransportFactory } from "../mod.ts";
import {
  assertNoLeakedFds,
  openFds,
  processAlive,
  readAll,
  readProcFile,
  ROOT,
  waitFor,
  within,
} from "./helpers/env.ts";

/** The adapter of each runtime. A new adapter joins the suite with one line here. */
const ADAPTERS: Record<string, () => Promise<TransportFactory>> = {
  deno: async () => (await import("../src/runtime/deno.ts")).denoTransport,
  bun: async () => (await import("../src/runtime/bun.ts")).bunTransport,
  node: async () => (await import("../src/runtime/node.ts")).nodeTransport,
};

const RUNTIME = "Bun" in globalThis ? "bun" : "Deno" in globalThis ? "deno" : "node";
const factory = await ADAPTERS[RUNTIME]();
const PEER = join(ROOT, "tests", "helpers", "transport-peer.py");

/** What the core may ask of a pipe: a small payload, a blob, a blob whose reader hashes it. */
const STREAM_KINDS = [
  { name: "a payload pipe", options: {} },
  { name: "a blob pipe", options: { pipeSize: 1 << 20 } },
  { name: "a blob pipe with a busy reader", options: { pipeSize: 1 << 20, readerBusy: true } },
];

async function spawnPeer(authData?: Uint8Array): Promise<Transport> {
  return await factory.spawn({
    argv: ({ sockfd, authfd }) => [
      "python3",
      PEER,
      "--sockfd",
      String(sockfd),
      ...(authfd === undefined ? [] : ["--authfd", String(authfd)]),
    ],
    env: {},
    authData,
    debug: false,
  });
}

/** Spawns the peer, runs `body`, closes, and checks that no fd leaked and the peer is gone. */
async function withPeer(body: (t: Transport) => Promise<void>, authData?: Uint8Array): Promise<void> {
  const before = openFds();
  const t = await spawnPeer(authData);
  try {
    await within(body(t), 15_000, "the test body");
  } finally {
    await within(t.close(500), 5000, "close()");
  }
  assert.equal(processAlive(t.pid!), false, "the peer is gone after close()");
  await assertNoLeakedFds(before);
}

interface Answer {
  value: unknown;
  fds: number[];
}

async function ask(t: Transport, command: Record<string, unknown>): Promise<Answer> {
  const { data, fds } = await t.request(new TextEncoder().encode(JSON.stringify(command)));
  return { value: JSON.parse(new TextDecoder().decode(data)).value, fds };
}

/** What fd `fd` of this process points to (`pipe:[123]`), to see it go even if the number is reused. */
function targetOf(fd: number): string {
  const target = openFds().get(fd);
  assert.ok(target, `fd ${fd} is open`);
  return target;
}

/** The pipes this process has open: the kind a reply carries (a runtime's own fds come and go). */
function openPipes(): string[] {
  return [...openFds().values()].filter((target) => target.startsWith("pipe:")).sort();
}

async function assertClosed(target: string, what: string): Promise<void> {
  await waitFor(() => ![...openFds().values()].includes(target), 2000, `${target} to be closed ${what}`);
}

function isCloseOnExec(fd: number): boolean {
  const flags = /flags:\s+([0-7]+)/.exec(readProcFile(`/proc/${process.pid}/fdinfo/${fd}`))?.[1];
  assert.ok(flags, `fdinfo of fd ${fd}`);
  return (parseInt(flags, 8) & 0o2000000) !== 0;
}

for (const count of [0, 1, 2]) {
  test(`a request gets its reply with ${count} fds, each readable to its end`, async () => {
    await withPeer(async (t) => {
      const { value, fds } = await ask(t, { op: "echo", fds: count });
      assert.equal(value, "echo");
      assert.equal(fds.length, count);
      const texts = await Promise.all(
        fds.map(async (fd) => new TextDecoder().decode(await readAll(t.openStream(fd)))),
      );
      assert.deepEqual(texts, fds.map((_, i) => `pipe ${i}`));
    });
  });
}

test("a reply that comes late (after the short wait on the JS thread) carries its fds too", async () => {
  await withPeer(async (t) => {
    const { value, fds } = await ask(t, { op: "echo", fds: 2, delay: 0.1 });
    assert.equal(value, "echo");
    assert.equal(fds.length, 2);
    for (const fd of fds) t.closeFd(fd);
  });
});

test("received fds are close-on-exec, whether the reply came at once or late", async () => {
  await withPeer(async (t) => {
    for (const delay of [0, 0.1]) {
      const { fds } = await ask(t, { op: "echo", fds: 2, delay });
      for (const fd of fds) assert.ok(isCloseOnExec(fd), `fd ${fd} (delay ${delay} s) is close-on-exec`);
      for (const fd of fds) t.closeFd(fd);
    }
  });
});

for (const { name, options } of STREAM_KINDS) {
  test(`${name}: the stream closes its fd at end of file`, async () => {
    await withPeer(async (t) => {
      const { fds: [fd] } = await ask(t, { op: "echo", fds: 1 });
      const target = targetOf(fd);
      assert.equal(new TextDecoder().decode(await readAll(t.openStream(fd, options))), "pipe 0");
      await assertClosed(target, "at end of file");
    });
  });

  test(`${name}: the stream closes its fd when reading fails`, async () => {
    await withPeer(async (t) => {
      const { fds: [fd] } = await ask(t, { op: "write-end" });
      const target = targetOf(fd);
      await assert.rejects(readAll(t.openStream(fd, options)));
      await assertClosed(target, "after the read error");
    });
  });

  test(`${name}: the stream closes its fd when cancelled`, async () => {
    await withPeer(async (t) => {
      const { fds: [fd] } = await ask(t, { op: "stall" });
      const target = targetOf(fd);
      const reader = t.openStream(fd, options).getReader();
      assert.equal((await reader.read()).value?.length, 1000);
      await reader.cancel();
      // A read still waiting on the pipe may be what closes the fd: give it data to return with.
      await ask(t, { op: "feed" });
      await assertClosed(target, "after cancel");
    });
  });
}

test("openFileSink leaves the fd with the caller when the file cannot be opened", async (ctx) => {
  await withPeer(async (t) => {
    if (!t.openFileSink) return ctx.skip("this transport has no file sinks");
    const { fds: [fd] } = await ask(t, { op: "echo", fds: 1 });
    const target = targetOf(fd);
    assert.throws(
      () => t.openFileSink!(fd, "/nonexistent-dir/blob", { pipeSize: 1 << 20 }),
      /Cannot open "\/nonexistent-dir\/blob" for writing: No such file or directory/,
    );
    assert.equal(openFds().get(fd), target, "the fd is still open");
    t.closeFd(fd);
    await assertClosed(target, "by closeFd");
  });
});

test("an oversized reply is a ProtocolError, its fds closed, and the next request still works", async () => {
  await withPeer(async (t) => {
    const before = openPipes();
    await assert.rejects(ask(t, { op: "big", fds: 2 }), (err: unknown) => {
      assert.ok(err instanceof ProtocolError, String(err));
      assert.match(err.message, /Reply larger than \d+ bytes/);
      return true;
    });
    assert.deepEqual(openPipes(), before, "every fd of the reply is closed");
    assert.equal((await ask(t, { op: "echo", fds: 0 })).value, "echo");
  });
});

test("a reply whose fds were cut is a ProtocolError, with the fds that came closed", async () => {
  await withPeer(async (t) => {
    const before = openPipes();
    await assert.rejects(ask(t, { op: "many", fds: 40 }), (err: unknown) => {
      assert.ok(err instanceof ProtocolError, String(err));
      assert.match(err.message, /more file descriptors than expected/);
      return true;
    });
    assert.deepEqual(openPipes(), before, "every fd that came is closed");
  });
});

for (const kind of ["file", "dir", "zero", "null", "socket"]) {
  test(`a received fd that is not a pipe (${kind}) is refused with a ProtocolError and closed, with the rest of its reply`, async () => {
    const scratch = mkdtempSync(join(tmpdir(), "cip-transport-"));
    const path = kind === "dir" ? scratch : kind === "file" ? join(scratch, "file") : `/dev/${kind}`;
    if (kind === "file") writeFileSync(path, "f".repeat(100_000));
    try {
      await withPeer(async (t) => {
        // What a refused reply would leave open: its pipe, and the fd of another kind.
        const leftOpen = () =>
          [...openFds().values()].filter((target) => /^(pipe|socket):/.test(target) || target === path)
            .sort();
        const before = leftOpen();
        await assert.rejects(ask(t, { op: "not-pipe", kind, path }), (err: unknown) => {
          assert.ok(err instanceof ProtocolError, String(err));
          assert.match(err.message, /not a pipe \(fd 2 of 2\)/);
          return true;
        });
        assert.deepEqual(leftOpen(), before, "every fd of the reply is closed");
        assert.equal((await ask(t, { op: "echo", fds: 0 })).value, "echo", "the next request still works");
      });
    } finally {
      rmSync(scratch, { recursive: true, force: true });
    }
  });
}

test("close() kills a child that ignores end of file once its grace is over", async () => {
  const before = openFds();
  const t = await spawnPeer();
  assert.equal((await ask(t, { op: "ignore-eof" })).value, "ignore-eof");
  const started = Date.now();
  const exit = await within(t.close(200), 5000, "close() of a child that ignores end of file");
  assert.ok(Date.now() - started >= 200, "the grace period was given");
  assert.equal(exit.killed, true);
  assert.equal(exit.signal, "SIGKILL", "SIGTERM is ignored too, so SIGKILL ends it");
  assert.equal(processAlive(t.pid!), false);
  assert.deepEqual(await t.exited, { ...exit, killed: true });
  await assertNoLeakedFds(before);
});

test("a child that exits while a request waits rejects that request, and exited tells how", async () => {
  await withPeer(async (t) => {
    const command = { op: "exit", code: 7, delay: 0.2, stderr: "peer: leaving mid-request" };
    await assert.rejects(t.request(new TextEncoder().encode(JSON.stringify(command))));
    const exit = await within(t.exited, 5000, "exited");
    assert.equal(exit.code, 7);
    assert.equal(exit.signal, null);
    assert.equal(exit.killed, false);
    assert.match(exit.stderrTail, /peer: leaving mid-request/);
    await assert.rejects(ask(t, { op: "echo", fds: 0 }), "a request after the exit fails too");
  });
});

test("send() delivers a packet that gets no reply", async () => {
  await withPeer(async (t) => {
    await t.send(new TextEncoder().encode(JSON.stringify({ op: "exit", code: 5 })));
    const exit = await within(t.exited, 5000, "the peer to act on the sent packet");
    assert.equal(exit.code, 5);
  });
});

test("pipeFill reports a full pipe as full, and a nearly empty one as not", async (ctx) => {
  await withPeer(async (t) => {
    if (!t.pipeFill) return ctx.skip("this transport has no pipeFill");
    const { value: written, fds: [full] } = await ask(t, { op: "full" });
    assert.deepEqual(t.pipeFill(full), { queued: written, capacity: written });
    const { fds: [small] } = await ask(t, { op: "echo", fds: 1 });
    assert.deepEqual(t.pipeFill(small), { queued: "pipe 0".length, capacity: written });
    t.closeFd(full);
    t.closeFd(small);
  });
});

test("auth data reaches the child through a memfd with its exact bytes, and none stays open here", async () => {
  const authData = new Uint8Array(200_000).map((_, i) => (i * 31) & 0xff);
  await withPeer(async (t) => {
    const memfds = [...openFds().values()].filter((target) => target.startsWith("/memfd:"));
    assert.deepEqual(memfds, [], "no memfd is left open in this process");
    assert.deepEqual((await ask(t, { op: "auth" })).value, {
      length: authData.length,
      sha256: createHash("sha256").update(authData).digest("hex"),
    });
  }, authData);
});
