// The configuration to skopeo command line mapping (src/config.ts): flag order, secrets, conflicts.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ConfigurationError, skopeoArgv } from "../mod.ts";

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
