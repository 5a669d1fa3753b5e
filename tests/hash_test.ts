// Client-side digests (src/hash.ts) for raw blobs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { Sha256 } from "../src/hash.ts";
import { noise } from "./helpers/fixtures.ts";

test("the pure JavaScript SHA-256 matches node:crypto across chunk boundaries", () => {
  const data = noise(200_003, 3);
  for (const chunk of [1, 63, 64, 65, 4096, 200_003]) {
    const hash = new Sha256();
    for (let i = 0; i < data.length; i += chunk) hash.update(data.subarray(i, i + chunk));
    assert.equal(hash.hexDigest(), createHash("sha256").update(data).digest("hex"), `chunk ${chunk}`);
  }
  assert.equal(
    new Sha256().hexDigest(),
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
  );
});
