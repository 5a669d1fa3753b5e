// Image reference parsing (src/reference.ts), for every transport containers/image knows.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ImageReference, InvalidReferenceError } from "../mod.ts";

test("references parse for every transport containers/image knows", () => {
  const good = [
    "docker://quay.io/fedora/fedora:40",
    "docker://busybox",
    "docker://localhost:5000/a/b@sha256:" + "0".repeat(64),
    "docker://[::1]:5000/app:v1",
    "registry:quay.io/fedora/fedora:40",
    "oci:/var/lib/layout",
    "oci:/var/lib/layout:tag",
    "oci-archive:/tmp/a.tar:latest",
    "docker-archive:/tmp/a.tar",
    "docker-archive:/tmp/a.tar:busybox:latest",
    "docker-archive:/tmp/a.tar:@0",
    "dir:/tmp/image",
    "containers-storage:localhost/app:latest",
    "containers-storage:[overlay@/var/lib/containers/storage]busybox",
    "containers-storage:" + "a".repeat(64),
    "docker-daemon:busybox:latest",
    "docker-daemon:sha256:" + "b".repeat(64),
  ];
  for (const text of good) {
    const ref = ImageReference.parse(text);
    assert.equal(String(ref), text);
  }
  assert.equal(ImageReference.parse("registry:quay.io/a:1").toSkopeo(), "docker://quay.io/a:1");
  assert.equal(ImageReference.from("oci", "/x:y").transport, "oci");
});

test("malformed references are refused with the reason", () => {
  const bad: [string, RegExp][] = [
    ["busybox", /TRANSPORT:NAME/],
    ["ftp://x", /unknown transport "ftp"/],
    ["docker:busybox", /start with "docker:\/\/"/],
    ["docker://", /empty/],
    ["docker://Quay.io/UPPER", /not a valid repository name/],
    ["docker://a/b:bad tag", /not a valid tag/],
    ["docker://a/b:1@sha256:" + "0".repeat(64), /both a tag and a digest/],
    ["docker://a/b@sha256:123", /not a valid sha256 digest/],
    ["oci:", /path is empty/],
    ["oci:/x:bad tag!", /not a valid image name/],
    ["dir:", /path is empty/],
    ["docker-archive:/a.tar:@x", /archive index/],
    ["containers-storage:[overlay", /closing bracket/],
  ];
  for (const [text, reason] of bad) {
    assert.throws(() => ImageReference.parse(text), (err: unknown) => {
      assert.ok(err instanceof InvalidReferenceError, text);
      assert.match(err.message, reason, text);
      assert.equal(err.reference, text);
      return true;
    });
  }
});
