// The wire codec (src/protocol.ts): request encoding, reply validation, version comparison.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ProtocolError } from "../mod.ts";
import { decodeReply, encodeRequest, MAX_REQUEST_SIZE, versionAtLeast } from "../src/protocol.ts";

test("requests over the server's 32 KiB limit are refused before sending", () => {
  assert.throws(() => encodeRequest("OpenImage", ["oci:/" + "x".repeat(MAX_REQUEST_SIZE)]), /limit of 32768/);
  assert.throws(() => encodeRequest("GetBlob", [1, "d", 2 ** 53]), RangeError);
  assert.throws(() => encodeRequest("GetBlob", [1.5, "d", 1]), RangeError);
  const packet = encodeRequest("GetBlob", [1, "sha256:x", 10]);
  assert.deepEqual(JSON.parse(new TextDecoder().decode(packet)), {
    method: "GetBlob",
    args: [1, "sha256:x", 10],
  });
});

test("replies are validated field by field", () => {
  const enc = (v: unknown) => new TextEncoder().encode(JSON.stringify(v));
  const ok = decodeReply("GetBlob", enc({ success: true, value: 5, pipeid: 3, error: "" }));
  assert.deepEqual(ok, { success: true, value: 5, pipeid: 3, error: "", errorCode: undefined });
  const failed = decodeReply("GetBlob", enc({ success: false, error: "x", error_code: "retryable" }));
  assert.equal(failed.errorCode, "retryable");
  assert.equal(
    decodeReply("GetBlob", enc({ success: false, error: "x", error_code: "new" })).errorCode,
    "other",
  );
  for (
    const bad of [[], null, 5, { value: 1 }, { success: "yes" }, { success: true, pipeid: -1 }, {
      success: true,
      pipeid: 1.5,
    }, { success: true, error: 3 }]
  ) {
    assert.throws(() => decodeReply("GetBlob", enc(bad)), ProtocolError, JSON.stringify(bad));
  }
  assert.throws(() => decodeReply("GetBlob", new Uint8Array([0xff, 0xfe])), ProtocolError);
});

test("protocol versions compare numerically", () => {
  assert.ok(versionAtLeast("0.2.10", "0.2.8"));
  assert.ok(versionAtLeast("0.3.0", "0.2.8"));
  assert.ok(!versionAtLeast("0.2.3", "0.2.4"));
  assert.ok(!versionAtLeast("1.0.0", "0.2.3"), "a new major version is not assumed compatible");
  assert.ok(!versionAtLeast("0.2", "0.2.3"));
});
