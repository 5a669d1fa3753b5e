import { after, test } from "node:test";
import assert from "node:assert/strict";
import type { ImageProxy } from "../mod.ts";
import {
  inspectArgv,
  InspectError,
  InvalidPlatformError,
  listPlatforms,
  parsePlatform,
  platformConfig,
  readFile,
} from "../src/image/inspect.ts";
import { parseArgs, UsageError } from "../src/cli/args.ts";
import { readAll, SERVERS } from "./helpers/env.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import { runCli } from "./helpers/cli-helpers.ts";
import { withProxy } from "./helpers/proxy.ts";
import { registry, REGISTRY_UNAVAILABLE, stopRegistries } from "./helpers/registry.ts";

const f = buildFixtures();
const MULTI = `oci:${f.multiLayout}:latest`;
const SINGLE = `oci:${f.layout}:latest`;

after(stopRegistries);

test("parsePlatform takes OS/ARCH and OS/ARCH/VARIANT and refuses anything else", () => {
  assert.deepEqual(parsePlatform("linux/arm64/v8"), { os: "linux", architecture: "arm64", variant: "v8" });
  assert.deepEqual(parsePlatform("linux/amd64"), { os: "linux", architecture: "amd64" });
  for (const bad of ["linux", "linux/", "/amd64", "linux/arm/v7/x", "linux/am d64", ""]) {
    assert.throws(() => parsePlatform(bad), InvalidPlatformError, bad);
  }
});

test("platformConfig sets the three override options and drops a variant the platform lacks", () => {
  assert.deepEqual(
    platformConfig({ authfile: "/a.json", overrideVariant: "v7" }, { os: "linux", architecture: "arm64" }),
    { authfile: "/a.json", overrideOs: "linux", overrideArch: "arm64" },
  );
});

test("inspectArgv gives skopeo inspect the proxy's settings, without the socket, and credentials on stdin", () => {
  const argv = inspectArgv(
    {
      skopeoCmd: ["skopeo"],
      authData: '{"auths":{"r.example":{"auth":"c2VjcmV0"}}}',
      certificateDirectory: "/certs",
      insecureSkipTlsVerification: true,
      registriesConf: "/r.conf",
      policy: "/p.json",
      userAgentPrefix: "ua",
    },
    "docker://r.example/app:1",
    ["--raw"],
  );
  assert.deepEqual(argv, [
    "skopeo",
    "--policy",
    "/p.json",
    "--registries-conf",
    "/r.conf",
    "--user-agent-prefix",
    "ua",
    "inspect",
    "--authfile",
    "/proc/self/fd/0",
    "--cert-dir",
    "/certs",
    "--tls-verify=false",
    "--raw",
    "docker://r.example/app:1",
  ]);
  assert.ok(!argv.join(" ").includes("c2VjcmV0"), "no secret on the command line");
  const defaults = inspectArgv({}, "oci:/x:latest", ["--raw"]);
  assert.deepEqual(defaults, [
    "setpriv",
    "--pdeathsig",
    "SIGTERM",
    "--",
    "skopeo",
    "inspect",
    "--raw",
    "oci:/x:latest",
  ]);
});

test("--platform sets the overrides, and conflicts with them", () => {
  assert.deepEqual(
    [parseArgs(["--platform", "linux/arm64/v8", "ls", "oci:/x:latest"]).config].map((c) => [
      c.overrideOs,
      c.overrideArch,
      c.overrideVariant,
    ]),
    [["linux", "arm64", "v8"]],
  );
  assert.throws(() => parseArgs(["--platform", "linux", "ls", "oci:/x:latest"]), UsageError);
  assert.throws(
    () => parseArgs(["--override-arch", "arm64", "--platform", "linux/amd64", "ls", "oci:/x:latest"]),
    UsageError,
  );
});

for (const server of SERVERS) {
  const config = { skopeoCmd: server.skopeoCmd };

  test(`listPlatforms lists every platform of an image index with its digest (${server.name})`, async () => {
    assert.deepEqual(await listPlatforms(config, MULTI), [
      { os: "linux", architecture: "amd64", digest: f.multi.amd64.manifest.digest },
      { os: "linux", architecture: "arm64", digest: f.multi.arm64.manifest.digest },
    ]);
    assert.deepEqual(await listPlatforms(config, SINGLE), [
      { os: "linux", architecture: "amd64", digest: f.image.manifest.digest },
    ]);
    await assert.rejects(listPlatforms(config, "oci:/nonexistent/layout:latest"), InspectError);
  });

  test(`a proxy spawned with platformConfig opens the platform it names (${server.name})`, async () => {
    await withProxy(server, async (proxy: ImageProxy) => {
      const image = await proxy.openImage(MULTI);
      assert.equal((await proxy.fetchManifest(image)).digest, f.multi.arm64.manifest.digest);
      assert.equal(new TextDecoder().decode(await readAll(await readFile(proxy, image, "arch"))), "arm64\n");
      await proxy.closeImage(image);
    }, platformConfig({}, parsePlatform("linux/arm64")));
  });

  test(`the platforms command prints one os/arch line per platform, and --platform picks one (${server.name})`, () => {
    const cli = (...args: string[]) => runCli(["--skopeo", server.skopeoCmd.join(" "), ...args]);
    const listed = cli("platforms", MULTI);
    assert.equal(listed.status, 0, listed.stderr);
    assert.equal(
      listed.text,
      `linux/amd64 ${f.multi.amd64.manifest.digest}\nlinux/arm64 ${f.multi.arm64.manifest.digest}\n`,
    );
    const arm = cli("--platform", "linux/arm64", "cat", MULTI, "arch");
    assert.equal(arm.status, 0, arm.stderr);
    assert.equal(arm.text, "arm64\n");
    const missing = cli("--platform", "linux/s390x", "cat", MULTI, "arch");
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /^error: .*s390x/);
    const bad = cli("--platform", "linux", "platforms", MULTI);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /^error: Invalid platform "linux"/);
  });
}

test("listPlatforms reaches an authenticated TLS registry with in-memory credentials", {
  skip: REGISTRY_UNAVAILABLE ?? (SERVERS.length === 0 ? "no skopeo" : false),
}, async () => {
  const reg = await registry("auth");
  await reg.push(MULTI, "multi:latest", { copyArgs: ["--all"] });
  const server = SERVERS[SERVERS.length - 1];
  const auth = Buffer.from(`${reg.username}:${reg.password}`).toString("base64");
  const config = {
    skopeoCmd: server.skopeoCmd,
    authData: JSON.stringify({ auths: { [reg.host]: { auth } } }),
    certificateDirectory: reg.certDir,
  };
  const platforms = await listPlatforms(config, reg.ref("multi:latest"));
  assert.deepEqual(platforms.map((p) => p.architecture), ["amd64", "arm64"]);
  await assert.rejects(
    listPlatforms(
      { skopeoCmd: server.skopeoCmd, certificateDirectory: reg.certDir, authAnonymous: true },
      reg.ref("multi:latest"),
    ),
    (err: unknown) => err instanceof InspectError && !err.message.includes(reg.password!),
  );
});
