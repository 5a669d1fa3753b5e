// Pure parts: the config-to-argv function, reference parsing, the wire codec, libc layouts, hashing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  ConfigurationError,
  ImageReference,
  InvalidReferenceError,
  ProtocolError,
  RequestError,
  skopeoArgv,
  UnsupportedMethodError,
} from "../mod.ts";
import { decodeReply, encodeRequest, MAX_REQUEST_SIZE, versionAtLeast } from "../src/protocol.ts";
import {
  cmsgSpaceForFds,
  MSGHDR_SIZE,
  packMsghdr,
  packScmRights,
  parseScmRights,
  readMsghdr,
} from "../src/runtime/libc.ts";
import { TailBuffer } from "../src/runtime/posix.ts";
import { Sha256 } from "../src/hash.ts";
import { noise } from "./helpers/fixtures.ts";

const FDS = { sockfd: 5 };

test("the default command binds skopeo to our life with setpriv and passes the socket fd", () => {
  assert.deepEqual(skopeoArgv({}, FDS), [
    "setpriv",
    "--pdeathsig",
    "SIGTERM",
    "--",
    "skopeo",
    "experimental-image-proxy",
    "--sockfd",
    "5",
  ]);
});

test("a custom command prefix replaces the default one", () => {
  assert.deepEqual(skopeoArgv({ skopeoCmd: ["/opt/skopeo"] }, FDS), [
    "/opt/skopeo",
    "experimental-image-proxy",
    "--sockfd",
    "5",
  ]);
});

test("global flags go before the subcommand, proxy flags after it", () => {
  const argv = skopeoArgv({
    skopeoCmd: ["skopeo"],
    debug: true,
    policy: "/p.json",
    registriesD: "/r.d",
    registriesConf: "/r.conf",
    overrideArch: "arm64",
    overrideOs: "linux",
    overrideVariant: "v8",
    userAgentPrefix: "me/1",
    tmpdir: "/var/tmp",
    authfile: "/auth.json",
    certificateDirectory: "/certs",
    insecureSkipTlsVerification: true,
  }, FDS);
  assert.deepEqual(argv, [
    "skopeo",
    "--debug",
    "--policy",
    "/p.json",
    "--registries.d",
    "/r.d",
    "--registries-conf",
    "/r.conf",
    "--override-arch",
    "arm64",
    "--override-os",
    "linux",
    "--override-variant",
    "v8",
    "--user-agent-prefix",
    "me/1",
    "--tmpdir",
    "/var/tmp",
    "experimental-image-proxy",
    "--authfile",
    "/auth.json",
    "--cert-dir",
    "/certs",
    "--tls-verify=false",
    "--sockfd",
    "5",
  ]);
});

test("auth data becomes an --authfile on the inherited memfd, never the secret itself", () => {
  const argv = skopeoArgv({ skopeoCmd: ["skopeo"], authData: '{"auths":{"x":{"auth":"c2VjcmV0"}}}' }, {
    sockfd: 3,
    authfd: 9,
  });
  assert.deepEqual(argv.slice(-4), ["--authfile", "/proc/self/fd/9", "--sockfd", "3"]);
  assert.ok(!argv.join(" ").includes("c2VjcmV0"));
});

test("anonymous auth passes --no-creds and decryption keys pass --decryption-key", () => {
  const argv = skopeoArgv({ skopeoCmd: ["s"], authAnonymous: true, decryptionKeys: ["/k1", "/k2"] }, FDS);
  assert.deepEqual(argv, [
    "s",
    "experimental-image-proxy",
    "--no-creds",
    "--decryption-key",
    "/k1",
    "--decryption-key",
    "/k2",
    "--sockfd",
    "5",
  ]);
});

test("conflicting or malformed options are ConfigurationErrors", () => {
  const cases: Parameters<typeof skopeoArgv>[0][] = [
    { authfile: "/a", authAnonymous: true },
    { authfile: "/a", authData: "{}" },
    { authData: "{}", authAnonymous: true },
    { policy: "/p", insecurePolicy: true },
    { skopeoCmd: [] },
    { authfile: "" },
    { certificateDirectory: "a\0b" },
    { insecureSkipTlsVerification: "yes" as unknown as boolean },
    { decryptionKeys: "key" as unknown as string[] },
  ];
  for (const config of cases) {
    assert.throws(
      () => skopeoArgv(config, { sockfd: 3, authfd: 4 }),
      ConfigurationError,
      JSON.stringify(config),
    );
  }
});

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

test("the stderr tail keeps the last lines within its limit", () => {
  const tail = new TailBuffer(32);
  const enc = new TextEncoder();
  for (let i = 0; i < 20; i++) tail.push(enc.encode(`line ${i}\n`));
  const text = tail.text();
  assert.ok(text.length <= 32);
  assert.ok(text.endsWith("line 19\n"));
  assert.ok(text.startsWith("line "), "cut at a line start");
});

test("request errors from setup mistakes say what to do about them", () => {
  const tls = new RequestError("OpenImage", "pinging: x509: certificate signed by unknown authority");
  assert.match(tls.message, /x509: certificate signed by unknown authority \(set "certificateDirectory"/);
  assert.equal(tls.serverMessage, "pinging: x509: certificate signed by unknown authority");
  assert.match(
    new RequestError("OpenImage", "http: server gave HTTP response to HTTPS client").message,
    /plain HTTP/,
  );
  assert.match(new RequestError("OpenImage", "authentication required").message, /"authfile" or "authData"/);
  assert.doesNotMatch(new RequestError("GetBlob", "no image 5").message, /\(/);
  assert.match(
    new UnsupportedMethodError("GetRawBlob", "0.2.8", "0.2.3").message,
    /needs proxy protocol version 0\.2\.8 or newer \(skopeo 1\.19 or newer\), but this proxy speaks 0\.2\.3/,
  );
});
