// Client-side digests (src/hash.ts) for raw blobs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { createHasher } from "../src/hash.ts";
import type { Hasher } from "../src/transport.ts";
import { noise } from "./helpers/fixtures.ts";

test("without a transport's hasher, sha256 and sha512 match node:crypto across chunk boundaries", () => {
  const data = noise(200_003, 3);
  for (const algorithm of ["sha256", "sha512"]) {
    for (const chunk of [1, 63, 64, 65, 4096, 200_003]) {
      const hash = createHasher(algorithm)!;
      for (let i = 0; i < data.length; i += chunk) hash.update(data.subarray(i, i + chunk));
      assert.equal(
        hash.hexDigest(),
        createHash(algorithm).update(data).digest("hex"),
        `${algorithm} ${chunk}`,
      );
    }
  }
  assert.equal(
    createHasher("sha256")!.hexDigest(),
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
  );
});

test("the transport's own hasher is preferred, and an unknown algorithm has none", () => {
  const own: Hasher = { update: () => {}, hexDigest: () => "own" };
  assert.equal(createHasher("sha256", () => own), own);
  assert.notEqual(
    createHasher("sha256", () => undefined),
    undefined,
    "falls back when the transport has none",
  );
  assert.equal(createHasher("md5"), undefined);
});
