/**
 * What containers/image gives us, proven end to end against a real registry: TLS and its absence,
 * every way of passing credentials, registries.conf rewrites and mirrors, signature policy, manifest
 * lists, Docker schema 2 conversion, missing images, and the other transports. Every test runs
 * against every skopeo in SERVERS unless the behaviour belongs to one protocol version.
 */

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import {
  ConfigurationError,
  ImageProxy,
  type ImageProxyConfig,
  type OpenedImage,
  RequestError,
  UnsupportedMethodError,
} from "../mod.ts";
import {
  assertNoLeakedFds,
  NEW_SERVER,
  openFds,
  processAlive,
  readAll,
  readProcFile,
  type Server,
  SERVERS,
} from "./helpers/env.ts";
import { buildFixtures, type BuiltImage, sha256 } from "./helpers/fixtures.ts";
import {
  type Registry,
  registry,
  REGISTRY_UNAVAILABLE,
  runCommand,
  stopRegistries,
  tempDir,
} from "./helpers/registry.ts";

const fixtures = buildFixtures();
const SOURCE = `oci:${fixtures.layout}:latest`;

let scratchDir: string | undefined;
/** A per-run folder for auth files, registries.conf, policies and keys; removed after the run. */
function scratch(name: string): string {
  scratchDir ??= tempDir("cip-registry-test-");
  return join(scratchDir!, name);
}

after(stopRegistries);

/** `a >= b` for dotted versions, written here rather than taken from the library under test. */
function atLeast(a: string, b: string): boolean {
  const x = a.split(".").map(Number);
  const y = b.split(".").map(Number);
  for (let i = 0; i < 3; i++) if (x[i] !== y[i]) return x[i] > y[i];
  return true;
}

/**
 * Pids of our children that are skopeo proxies (setpriv and the wrapper exec into skopeo under the same
 * pid). Read through subprocesses: Deno guards /proc even from --allow-read.
 */
function proxyChildren(): number[] {
  // The bracket keeps grep from matching its own command line (or its shell's).
  const files = execFileSync("sh", [
    "-c",
    "grep -las 'experimental-image-prox[y]' /proc/[0-9]*/cmdline; true",
  ], {
    encoding: "utf8",
  });
  const pids: number[] = [];
  for (const pid of files.split("\n").map((f) => /^\/proc\/(\d+)\//.exec(f)?.[1]).filter(Boolean)) {
    try {
      const stat = readProcFile(`/proc/${pid}/stat`);
      const [state, ppid] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(ppid) === process.pid && state !== "Z") pids.push(Number(pid));
    } catch { /* gone meanwhile */ }
  }
  return pids;
}

/**
 * Runs `body` with a proxy of `server`, then checks that shutting it down left no fd and no process.
 * Anything the test needs from a registry must be set up before, so that its fds are not counted.
 */
async function withProxy(
  server: Server,
  config: ImageProxyConfig,
  body: (proxy: ImageProxy, pid: number) => Promise<void>,
): Promise<void> {
  const before = openFds();
  const childrenBefore = proxyChildren();
  const proxy = await ImageProxy.spawn({ ...config, skopeoCmd: server.skopeoCmd });
  const pid = proxy.pid;
  assert.ok(pid !== undefined && pid > 0, "the proxy reports its pid");
  let failed = true;
  try {
    assert.equal(proxy.protocolVersion, server.protocol);
    await body(proxy, pid);
    failed = false;
  } finally {
    const closing = proxy.shutdown();
    if (failed) await closing.catch(() => {});
    else await closing;
  }
  assert.equal(processAlive(pid), false, `skopeo (pid ${pid}) is gone after shutdown`);
  assert.deepEqual(proxyChildren().filter((p) => !childrenBefore.includes(p)), []);
  await assertNoLeakedFds(before);
}

/** Checks that a spawn fails as `check` expects, leaving no fd and no process behind. */
async function expectSpawnFailure(
  config: ImageProxyConfig,
  check: (err: unknown) => boolean,
): Promise<void> {
  const before = openFds();
  const childrenBefore = proxyChildren();
  await assert.rejects(ImageProxy.spawn(config), check);
  assert.deepEqual(proxyChildren().filter((p) => !childrenBefore.includes(p)), []);
  await assertNoLeakedFds(before);
}

/** The image's layers as fetched through the proxy (verified by it), in manifest order. */
async function fetchLayers(proxy: ImageProxy, image: OpenedImage): Promise<Uint8Array[]> {
  const { manifest } = await proxy.fetchManifest(image);
  const layers: Uint8Array[] = [];
  for (const layer of manifest.layers) {
    const { stream } = await proxy.getDescriptor(image, layer);
    layers.push(await readAll(stream));
  }
  return layers;
}

/** Checks that `image` is the base fixture: manifest digest and every layer's bytes. */
async function assertIsBaseFixture(proxy: ImageProxy, image: OpenedImage): Promise<void> {
  const { digest, manifest } = await proxy.fetchManifest(image);
  assert.equal(digest, fixtures.image.manifest.digest);
  assert.deepEqual(manifest.layers.map((l) => l.digest), fixtures.image.layers.map((l) => l.digest));
  const layers = await fetchLayers(proxy, image);
  assert.deepEqual(layers.map((bytes) => sha256(bytes)), fixtures.image.layers.map((l) => l.digest));
  await proxy.closeImage(image);
}

/** Opens a reference expecting a RequestError from OpenImage whose message matches `pattern`. */
async function assertOpenFails(proxy: ImageProxy, reference: string, pattern: RegExp): Promise<void> {
  await assert.rejects(proxy.openImage(reference), (err: unknown) => {
    assert.ok(err instanceof RequestError, `expected a RequestError, got ${err}`);
    assert.equal(err.method, "OpenImage");
    assert.match(err.message, pattern);
    assert.ok(err.message.includes(reference.replace(/^docker:\/\//, "")), "the message names the image");
    return true;
  });
}

/** The registry of `variant` with the base fixture pushed as `app:latest`. */
async function withBaseImage(variant: "plain" | "tls" | "auth"): Promise<Registry> {
  const reg = await registry(variant);
  await reg.push(SOURCE, "app:latest");
  return reg;
}

/** An auth.json granting `reg`'s credentials. */
function authJson(reg: Registry): string {
  const auth = Buffer.from(`${reg.username}:${reg.password}`).toString("base64");
  return JSON.stringify({ auths: { [reg.host]: { auth } } });
}

function secretsOf(reg: Registry): string[] {
  return [reg.password!, Buffer.from(`${reg.username}:${reg.password}`).toString("base64")];
}

const skip = REGISTRY_UNAVAILABLE ? { skip: REGISTRY_UNAVAILABLE } : {};

for (const server of SERVERS) {
  const name = server.name;
  const policyEnforced = atLeast(server.protocol, "0.2.6");
  const hasOpenImageOptional = atLeast(server.protocol, "0.2.4");

  // --- TLS ------------------------------------------------------------------------------------------

  test(`${name}: pulls from a plain-HTTP registry with insecureSkipTlsVerification`, skip, async () => {
    const reg = await withBaseImage("plain");
    await withProxy(server, { insecureSkipTlsVerification: true }, async (proxy) => {
      await assertIsBaseFixture(proxy, await proxy.openImage(reg.ref("app:latest")));
    });
  });

  test(`${name}: verifies a TLS registry against the CA in certificateDirectory`, skip, async () => {
    const reg = await withBaseImage("tls");
    await withProxy(server, { certificateDirectory: reg.certDir }, async (proxy) => {
      await assertIsBaseFixture(proxy, await proxy.openImage(reg.ref("app:latest")));
    });
  });

  test(`${name}: rejects a TLS registry signed by an unknown CA with a certificate error`, skip, async () => {
    const reg = await withBaseImage("tls");
    await withProxy(server, {}, async (proxy) => {
      await assertOpenFails(proxy, reg.ref("app:latest"), /certificate/i);
    });
  });

  // --- Credentials ----------------------------------------------------------------------------------

  test(`${name}: authenticates with the auth.json named by authfile`, skip, async () => {
    const reg = await withBaseImage("auth");
    const authfile = scratch(`auth-${server.protocol}.json`);
    writeFileSync(authfile, authJson(reg), { mode: 0o600 });
    await withProxy(server, { authfile, certificateDirectory: reg.certDir }, async (proxy) => {
      await assertIsBaseFixture(proxy, await proxy.openImage(reg.ref("app:latest")));
    });
  });

  test(
    `${name}: authenticates with in-memory authData that appears in neither its cmdline nor its environment`,
    skip,
    async () => {
      const reg = await withBaseImage("auth");
      const config = { authData: authJson(reg), certificateDirectory: reg.certDir };
      await withProxy(server, config, async (proxy, pid) => {
        const cmdline = readProcFile(`/proc/${pid}/cmdline`).split("\0");
        const environ = readProcFile(`/proc/${pid}/environ`);
        // Guards against reading nothing (or the wrong process), which would make the checks vacuous.
        assert.ok(cmdline.includes("experimental-image-proxy"), "read the proxy's command line");
        assert.match(environ, /(^|\0)PATH=/, "read the proxy's environment");
        for (const secret of secretsOf(reg)) {
          assert.ok(!cmdline.join(" ").includes(secret), "the secret is not on the command line");
          assert.ok(!environ.includes(secret), "the secret is not in the environment");
        }
        // The credentials reach skopeo as an inherited memfd named on the command line by fd number.
        const authfile = cmdline[cmdline.indexOf("--authfile") + 1];
        const fd = /^\/proc\/self\/fd\/(\d+)$/.exec(authfile)?.[1];
        assert.ok(fd, `--authfile names an inherited fd, got ${JSON.stringify(authfile)}`);
        const target = execFileSync("readlink", [`/proc/${pid}/fd/${fd}`], { encoding: "utf8" });
        assert.match(target, /^\/memfd:/);
        await assertIsBaseFixture(proxy, await proxy.openImage(reg.ref("app:latest")));
      });
    },
  );

  test(`${name}: authenticates with REGISTRY_AUTH_FILE passed through env`, skip, async () => {
    const reg = await withBaseImage("auth");
    const authfile = scratch(`registry-auth-file-${server.protocol}.json`);
    writeFileSync(authfile, authJson(reg), { mode: 0o600 });
    const config = { env: { REGISTRY_AUTH_FILE: authfile }, certificateDirectory: reg.certDir };
    await withProxy(server, config, async (proxy, pid) => {
      assert.ok(readProcFile(`/proc/${pid}/environ`).split("\0").includes(`REGISTRY_AUTH_FILE=${authfile}`));
      await assertIsBaseFixture(proxy, await proxy.openImage(reg.ref("app:latest")));
    });
  });

  test(`${name}: authAnonymous is refused by a registry that requires authentication`, skip, async () => {
    const reg = await withBaseImage("auth");
    const config = { authAnonymous: true, certificateDirectory: reg.certDir };
    await withProxy(server, config, async (proxy) => {
      await assertOpenFails(proxy, reg.ref("app:latest"), /unauthorized|authentication required/i);
    });
  });

  // --- registries.conf ------------------------------------------------------------------------------

  test(`${name}: registriesConf rewrites an unresolvable prefix to the local registry`, skip, async () => {
    const reg = await withBaseImage("plain");
    const registriesConf = scratch(`rewrite-${server.protocol}.conf`);
    writeFileSync(
      registriesConf,
      [
        "unqualified-search-registries = []",
        "[[registry]]",
        'prefix = "rewritten.invalid/app"',
        `location = "${reg.host}/app"`,
        "insecure = true",
      ].join("\n") + "\n",
    );
    // Without the rewrite, the name leads nowhere.
    await withProxy(server, {}, async (proxy) => {
      await assertOpenFails(proxy, "docker://rewritten.invalid/app:latest", /rewritten\.invalid/);
    });
    await withProxy(server, { registriesConf }, async (proxy) => {
      await assertIsBaseFixture(proxy, await proxy.openImage("docker://rewritten.invalid/app:latest"));
    });
  });

  test(`${name}: registriesConf pulls through a mirror when the primary is unreachable`, skip, async () => {
    const reg = await withBaseImage("plain");
    const registriesConf = scratch(`mirror-${server.protocol}.conf`);
    writeFileSync(
      registriesConf,
      [
        "unqualified-search-registries = []",
        "[[registry]]",
        'location = "primary.invalid"',
        "[[registry.mirror]]",
        `location = "${reg.host}"`,
        "insecure = true",
      ].join("\n") + "\n",
    );
    await withProxy(server, {}, async (proxy) => {
      await assertOpenFails(proxy, "docker://primary.invalid/app:latest", /primary\.invalid/);
    });
    await withProxy(server, { registriesConf }, async (proxy) => {
      await assertIsBaseFixture(proxy, await proxy.openImage("docker://primary.invalid/app:latest"));
    });
  });

  // --- Signature policy -----------------------------------------------------------------------------

  if (policyEnforced) {
    test(`${name}: a sigstoreSigned policy admits an image signed with its key`, skip, async () => {
      const setup = await signatureSetup();
      await withProxy(server, setup.config, async (proxy) => {
        await assertIsBaseFixture(proxy, await proxy.openImage(setup.registry.ref("signed:latest")));
      });
    });

    test(
      `${name}: a sigstoreSigned policy rejects an unsigned image, naming the missing signature`,
      skip,
      async () => {
        const setup = await signatureSetup();
        await withProxy(server, setup.config, async (proxy) => {
          await assertOpenFails(proxy, setup.registry.ref("unsigned:latest"), /signature/i);
          // The same proxy still serves the signed image: the rejection is per image, not fatal.
          await assertIsBaseFixture(proxy, await proxy.openImage(setup.registry.ref("signed:latest")));
        });
      },
    );
  } else {
    test(
      `${name}: spawn with a policy fails with a ConfigurationError because protocol ${server.protocol} ignores it`,
      skip,
      async () => {
        const setup = await signatureSetup();
        await expectSpawnFailure({ ...setup.config, skopeoCmd: server.skopeoCmd }, (err: unknown) => {
          assert.ok(err instanceof ConfigurationError, `expected a ConfigurationError, got ${err}`);
          assert.match(err.message, /"policy"/);
          assert.match(err.message, new RegExp(`protocol ${server.protocol.replaceAll(".", "\\.")}`));
          assert.match(err.message, /signature policy/);
          assert.match(err.message, /skopeo 1\.13 or newer/);
          return true;
        });
      },
    );
  }

  // --- Manifest lists -------------------------------------------------------------------------------

  const hostArch = ({ x64: "amd64", arm64: "arm64" } as Record<string, string>)[process.arch];

  test(`${name}: a manifest list resolves to the host platform's instance and its digest`, skip, async () => {
    assert.ok(hostArch, `the fixture index has no instance for ${process.arch}`);
    const reg = await withMultiArchImage();
    const expected = fixtures.multi[hostArch as "amd64" | "arm64"];
    await withProxy(server, { insecureSkipTlsVerification: true }, async (proxy) => {
      await assertIsInstance(proxy, await proxy.openImage(reg.ref("multi:latest")), expected);
    });
  });

  test(`${name}: overrideArch and overrideOs pick the other instance of a manifest list`, skip, async () => {
    const other = hostArch === "arm64" ? "amd64" : "arm64";
    const reg = await withMultiArchImage();
    const config = { insecureSkipTlsVerification: true, overrideArch: other, overrideOs: "linux" };
    await withProxy(server, config, async (proxy) => {
      await assertIsInstance(proxy, await proxy.openImage(reg.ref("multi:latest")), fixtures.multi[other]);
    });
  });

  // --- Docker schema 2 ------------------------------------------------------------------------------

  test(
    `${name}: a Docker schema 2 image arrives as an OCI manifest with the stored manifest's digest`,
    skip,
    async () => {
      const reg = await registry("plain");
      await reg.push(SOURCE, "v2s2:latest", { copyArgs: ["--format", "v2s2"] });
      const stored = await reg.rawManifest("v2s2:latest");
      const storedManifest = JSON.parse(new TextDecoder().decode(stored));
      assert.equal(storedManifest.mediaType, "application/vnd.docker.distribution.manifest.v2+json");
      const storedDigest = sha256(stored);

      await withProxy(server, { insecureSkipTlsVerification: true }, async (proxy) => {
        const image = await proxy.openImage(reg.ref("v2s2:latest"));
        const { digest, raw } = await proxy.fetchManifestRaw(image);
        assert.equal(digest, storedDigest, "the digest is the stored schema 2 manifest's");
        assert.notEqual(sha256(raw), storedDigest, "the manifest itself was converted");
        const { manifest } = await proxy.fetchManifest(image);
        assert.equal(manifest.mediaType, "application/vnd.oci.image.manifest.v1+json");
        assert.equal(manifest.config.mediaType, "application/vnd.oci.image.config.v1+json");
        for (const layer of manifest.layers) {
          assert.equal(layer.mediaType, "application/vnd.oci.image.layer.v1.tar+gzip");
        }
        assert.deepEqual(
          manifest.layers.map((l) => l.digest),
          storedManifest.layers.map((l: { digest: string }) => l.digest),
        );
        const layers = await fetchLayers(proxy, image);
        assert.deepEqual(layers.map(uncompressedDigest), fixtures.image.layers.map((l) => l.diffId));
        await proxy.closeImage(image);
      });
    },
  );

  // --- Missing images -------------------------------------------------------------------------------

  if (hasOpenImageOptional) {
    test(`${name}: openImageOptional returns null for a tag the registry does not have`, skip, async () => {
      const reg = await withBaseImage("plain");
      await withProxy(server, { insecureSkipTlsVerification: true }, async (proxy) => {
        assert.equal(await proxy.openImageOptional(reg.ref("app:no-such-tag")), null);
        const present = await proxy.openImageOptional(reg.ref("app:latest"));
        assert.ok(present, "an existing tag opens");
        await assertIsBaseFixture(proxy, present);
      });
    });
  } else {
    test(
      `${name}: openImageOptional rejects with UnsupportedMethodError naming protocol 0.2.4`,
      skip,
      async () => {
        const reg = await withBaseImage("plain");
        await withProxy(server, { insecureSkipTlsVerification: true }, async (proxy) => {
          await assert.rejects(proxy.openImageOptional(reg.ref("app:no-such-tag")), (err: unknown) => {
            assert.ok(err instanceof UnsupportedMethodError, `expected UnsupportedMethodError, got ${err}`);
            assert.equal(err.requiredVersion, "0.2.4");
            assert.match(err.message, /OpenImageOptional/);
            assert.match(err.message, /0\.2\.4/);
            return true;
          });
          // openImage still tells a missing tag apart with a RequestError.
          await assertOpenFails(proxy, reg.ref("app:no-such-tag"), /manifest unknown|not found/i);
        });
      },
    );
  }

  // --- Other transports -----------------------------------------------------------------------------

  test(
    `${name}: oci, oci-archive, docker-archive and dir serve the registry copy's layer content`,
    skip,
    async () => {
      const reg = await withBaseImage("plain");
      await withProxy(server, { insecureSkipTlsVerification: true }, async (proxy) => {
        const fromRegistry = await proxy.openImage(reg.ref("app:latest"));
        const registryLayers = await fetchLayers(proxy, fromRegistry);
        const registryConfig = await proxy.fetchConfig(fromRegistry);
        await proxy.closeImage(fromRegistry);
        const registryDigests = registryLayers.map((bytes) => sha256(bytes));
        const contents = registryLayers.map(uncompressedDigest);
        assert.deepEqual(contents, fixtures.image.layers.map((l) => l.diffId));

        const references: [string, "same blobs" | "uncompressed"][] = [
          [`oci:${fixtures.layout}:latest`, "same blobs"],
          [`oci-archive:${fixtures.ociArchive}:latest`, "same blobs"],
          [`dir:${fixtures.dir}`, "same blobs"],
          // docker-archive stores layers uncompressed: only the content can match.
          [`docker-archive:${fixtures.dockerArchive}:fixture/base:latest`, "uncompressed"],
        ];
        for (const [reference, kind] of references) {
          const image = await proxy.openImage(reference);
          const layers = await fetchLayers(proxy, image);
          const config = await proxy.fetchConfig(image);
          await proxy.closeImage(image);
          assert.deepEqual(layers.map(uncompressedDigest), contents, `${reference}: layer content`);
          assert.deepEqual(config.rootfs.diff_ids, registryConfig.rootfs.diff_ids, `${reference}: diff_ids`);
          if (kind === "same blobs") {
            assert.deepEqual(
              layers.map((bytes) => sha256(bytes)),
              registryDigests,
              `${reference}: layer blobs`,
            );
          } else {
            assert.deepEqual(
              layers.map((bytes) => sha256(bytes)),
              contents,
              `${reference}: uncompressed blobs`,
            );
          }
        }
      });
    },
  );
}

/** sha256 of a layer's tar stream: gunzipped when gzip'd, as is otherwise. */
function uncompressedDigest(bytes: Uint8Array): string {
  const gzip = bytes.length > 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;
  return sha256(gzip ? new Uint8Array(gunzipSync(bytes)) : bytes);
}

/** The plain registry with the two-platform index pushed as `multi:latest`, index and instances intact. */
async function withMultiArchImage(): Promise<Registry> {
  const reg = await registry("plain");
  await reg.push(`oci:${fixtures.multiLayout}:latest`, "multi:latest", { copyArgs: ["--all"] });
  const index = await reg.rawManifest("multi:latest");
  assert.equal(sha256(index), fixtures.multi.index.digest, "the registry holds the index unchanged");
  return reg;
}

/** Checks that `image` resolved to the `expected` instance: its manifest digest, not the index's. */
async function assertIsInstance(
  proxy: ImageProxy,
  image: OpenedImage,
  expected: BuiltImage,
): Promise<void> {
  const { digest, manifest } = await proxy.fetchManifest(image);
  assert.notEqual(digest, fixtures.multi.index.digest, "not the index digest");
  assert.equal(digest, expected.manifest.digest);
  assert.equal(manifest.config.digest, expected.config.digest);
  const config = await proxy.fetchConfig(image);
  assert.equal(config.architecture, expected.architecture);
  const [layer] = await fetchLayers(proxy, image);
  assert.equal(sha256(layer), expected.layers[0].digest);
  assert.ok(
    new TextDecoder().decode(gunzipSync(layer)).includes(`${expected.architecture}\n`),
    "the layer is the instance's",
  );
  await proxy.closeImage(image);
}

interface SignatureSetup {
  registry: Registry;
  config: ImageProxyConfig;
}

let signatureSetupPromise: Promise<SignatureSetup> | undefined;

/**
 * A sigstore key pair, `signed:latest` pushed with a signature (by skopeo 1.22; 1.9.3 cannot sign with
 * sigstore keys) and `unsigned:latest` without one, a registries.d that stores and finds sigstore
 * signatures as registry attachments, and a policy that requires them for the local registry.
 */
function signatureSetup(): Promise<SignatureSetup> {
  signatureSetupPromise ??= (async () => {
    if (!NEW_SERVER) throw new Error("Signing needs skopeo 1.22 (run .ci/setup)");
    const reg = await registry("plain");
    const keyPrefix = scratch("sigstore-key");
    const passphrase = scratch("sigstore-passphrase");
    writeFileSync(passphrase, "correct horse battery staple", { mode: 0o600 });
    await runCommand([
      ...NEW_SERVER.binary,
      "generate-sigstore-key",
      "--output-prefix",
      keyPrefix,
      "--passphrase-file",
      passphrase,
    ]);
    const registriesD = scratch("registries.d");
    mkdirSync(registriesD);
    writeFileSync(
      join(registriesD, "local.yaml"),
      `docker:\n  ${reg.host}:\n    use-sigstore-attachments: true\n`,
    );
    await reg.push(SOURCE, "signed:latest", {
      skopeo: NEW_SERVER.binary,
      globalArgs: ["--registries.d", registriesD],
      copyArgs: [
        "--sign-by-sigstore-private-key",
        `${keyPrefix}.private`,
        "--sign-passphrase-file",
        passphrase,
      ],
    });
    await reg.push(SOURCE, "unsigned:latest");
    const policy = scratch("policy.json");
    writeFileSync(
      policy,
      JSON.stringify({
        default: [{ type: "insecureAcceptAnything" }],
        transports: {
          docker: {
            [reg.host]: [{
              type: "sigstoreSigned",
              keyPath: `${keyPrefix}.pub`,
              signedIdentity: { type: "matchRepository" },
            }],
          },
        },
      }),
    );
    return {
      registry: reg,
      config: { policy, registriesD, insecureSkipTlsVerification: true },
    };
  })();
  return signatureSetupPromise;
}
