// The core's request queue against a scripted in-process transport: one request on the wire at a time,
// in the order they were asked, whether the transport answers at once (`requestNow`) or later. The
// real transports are covered by the integration tests; this one can answer in any mix, on demand.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ImageProxy, ProxyExitedError, RequestError } from "../mod.ts";
import type { ChildExit, ReceivedPacket, Transport } from "../src/transport.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

interface Script {
  /** How to answer the request for this image number: now, later (after `ms`), or by throwing. */
  answer(n: number): "now" | "throw" | { laterMs: number };
}

/** A transport that answers OpenImage("oci:/image:N") with image id N, as the script says. */
function scripted(script: Script) {
  let exit: (value: ChildExit) => void = () => {};
  const exited = new Promise<ChildExit>((resolve) => exit = resolve);
  const log = { sent: [] as number[], overlaps: 0 };
  let onWire = false;
  const reply = (value: unknown, success = true): ReceivedPacket => ({
    data: encoder.encode(
      JSON.stringify({ success, value, pipeid: 0, error: success ? "" : "no such image" }),
    ),
    fds: [],
  });
  const requestNow = (packet: Uint8Array): ReceivedPacket | Promise<ReceivedPacket> => {
    if (onWire) log.overlaps++;
    const { method, args } = JSON.parse(decoder.decode(packet));
    if (method === "Initialize") return reply("0.2.8");
    const n = Number(/:(\d+)$/.exec(String(args[0]))?.[1]);
    log.sent.push(n);
    const answer = script.answer(n);
    if (answer === "throw") {
      // As a real transport's send fails: the child is gone.
      exit({ code: null, signal: "SIGKILL", stderrTail: "killed by the test", killed: false });
      throw new Error("send failed");
    }
    const value = n % 7 === 0 ? reply(null, false) : reply(n);
    if (answer === "now") return value;
    onWire = true;
    return new Promise((resolve) =>
      setTimeout(() => {
        onWire = false;
        resolve(value);
      }, answer.laterMs)
    );
  };
  const transport: Transport = {
    requestNow,
    request: (packet) => {
      try {
        return Promise.resolve(requestNow(packet));
      } catch (err) {
        return Promise.reject(err);
      }
    },
    send: () => {
      exit({ code: 0, signal: null, stderrTail: "", killed: false }); // Shutdown
      return Promise.resolve();
    },
    openStream: () => {
      throw new Error("no pipes here");
    },
    closeFd: () => {},
    exited,
    close: () => {
      exit({ code: 0, signal: null, stderrTail: "", killed: false });
      return exited;
    },
  };
  return { transport, log };
}

async function spawn(script: Script) {
  const { transport, log } = scripted(script);
  const proxy = await ImageProxy.spawn({ transport: { spawn: () => Promise.resolve(transport) } });
  return { proxy, log };
}

/** Opens images 1..count all at once; each settles with its own id, or its own error. */
async function openAll(proxy: ImageProxy, count: number): Promise<(number | string)[]> {
  const opens = Array.from({ length: count }, (_, i) =>
    proxy.openImage(`oci:/image:${i + 1}`).then(
      (img) => img.id,
      (err) => err instanceof RequestError ? `failed ${i + 1}` : `unexpected ${err}`,
    ));
  return await Promise.all(opens);
}

function expected(count: number): (number | string)[] {
  return Array.from({ length: count }, (_, i) => (i + 1) % 7 === 0 ? `failed ${i + 1}` : i + 1);
}

test("requests answered at once and later, asked all at once, go out one at a time and in order", async () => {
  // A mix: every third answer comes after a timer, the others within the call.
  const { proxy, log } = await spawn({ answer: (n) => n % 3 === 0 ? { laterMs: (n * 7) % 4 } : "now" });
  assert.deepEqual(await openAll(proxy, 60), expected(60));
  assert.deepEqual(log.sent, Array.from({ length: 60 }, (_, i) => i + 1));
  assert.equal(log.overlaps, 0, "a request was sent while another waited for its reply");
  await proxy.shutdown();
});

test("requests awaited one after another each get their own reply, on either path", async () => {
  const { proxy, log } = await spawn({ answer: (n) => n % 2 ? "now" : { laterMs: 0 } });
  for (let n = 1; n <= 20; n++) {
    const result = await proxy.openImage(`oci:/image:${n}`).then((img) => img.id, (err) => err);
    if (n % 7 === 0) assert.ok(result instanceof RequestError, String(result));
    else assert.equal(result, n);
  }
  assert.equal(log.overlaps, 0);
  await proxy.shutdown();
});

test("a send that fails as the child dies rejects that request and the queued ones with the exit", async () => {
  const { proxy, log } = await spawn({ answer: (n) => n === 2 ? "throw" : "now" });
  const [one, ...rest] = await Promise.allSettled(
    [1, 2, 3, 4].map((n) => proxy.openImage(`oci:/image:${n}`)),
  );
  assert.equal(one.status === "fulfilled" && one.value.id, 1);
  for (const result of rest) {
    assert.ok(result.status === "rejected" && result.reason instanceof ProxyExitedError, String(result));
    assert.match(result.reason.message, /signal SIGKILL/);
  }
  assert.deepEqual(log.sent, [1, 2], "nothing is sent after the failed send");
  await assert.rejects(proxy.shutdown(), /signal SIGKILL/);
});
