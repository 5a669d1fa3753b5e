// The libc layouts both adapters share (src/runtime/libc.ts): msghdr, SCM_RIGHTS; and the stderr tail (posix.ts).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  cmsgSpaceForFds,
  MSGHDR_SIZE,
  packMsghdr,
  packScmRights,
  parseScmRights,
  readMsghdr,
} from "../src/runtime/libc.ts";
import { TailBuffer } from "../src/runtime/posix.ts";

test("msghdr and SCM_RIGHTS layouts round-trip", () => {
  const msghdr = new DataView(new ArrayBuffer(MSGHDR_SIZE));
  const iovec = new DataView(new ArrayBuffer(16));
  packMsghdr(msghdr, iovec, 0x1000n, { address: 0x2000n, length: 4096 }, { address: 0x3000n, length: 64 });
  assert.equal(iovec.getBigUint64(0, true), 0x2000n);
  assert.equal(iovec.getBigUint64(8, true), 4096n);
  assert.equal(msghdr.getBigUint64(16, true), 0x1000n);
  assert.equal(msghdr.getBigUint64(24, true), 1n);
  assert.equal(msghdr.getBigUint64(32, true), 0x3000n);
  assert.deepEqual(readMsghdr(msghdr), { flags: 0, controlLength: 64 });
  const control = new Uint8Array(cmsgSpaceForFds(3));
  const length = packScmRights(control, [7, 8, 9]);
  assert.equal(length, 32);
  assert.deepEqual(parseScmRights(control, length), [7, 8, 9]);
  assert.deepEqual(parseScmRights(control, 0), []);
  // A corrupt length stops the walk instead of reading past the buffer.
  new DataView(control.buffer).setBigUint64(0, 1000n, true);
  assert.deepEqual(parseScmRights(control, length), []);
});

test("the stderr tail keeps the last lines within its limit", () => {
  const tail = new TailBuffer(32);
  const enc = new TextEncoder();
  for (let i = 0; i < 20; i++) tail.push(enc.encode(`line ${i}\n`));
  const text = tail.text();
  assert.ok(text.length <= 32);
  assert.ok(text.endsWith("line 19\n"));
  assert.ok(text.startsWith("line "), "cut at a line start");
});
