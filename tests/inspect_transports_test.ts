import { after, test } from "node:test";
import assert from "node:assert/strict";
import { exportImage, listImage, readFile } from "../src/image/inspect.ts";
import type { ImageProxy } from "../mod.ts";
import { readAll, SERVERS } from "./helpers/env.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import { digestOf, runCli } from "./helpers/cli-helpers.ts";
import { registry, REGISTRY_UNAVAILABLE, stopRegistries } from "./helpers/registry.ts";
import { withProxy } from "./helpers/proxy.ts";

after(stopRegistries);

const f = buildFixtures();
const OCI = `oci:${f.layout}:latest`;
const registrySkip = REGISTRY_UNAVAILABLE ?? false;

/** What ls, cat and export give for `ref`: the listing, two files and the export's digest. */
async function inspect(proxy: ImageProxy, ref: string) {
  const image = await proxy.openImage(ref);
  const listing = [];
  for await (const e of listImage(proxy, image)) listing.push([e.path, e.type, e.mode, e.size, e.linkname]);
  const text = async (path: string) =>
    new TextDecoder().decode(await readAll(await readFile(proxy, image, path)));
  const result = {
    listing,
    motd: await text("etc/motd"),
    shell: await text("bin/sh"),
    exported: digestOf(await readAll(exportImage(proxy, image))),
  };
  await proxy.closeImage(image);
  return result;
}

for (const server of SERVERS) {
  test(`ls, cat and export see the same image through oci-archive:, docker-archive: and a registry (${server.name})`, async () => {
    const sources: [string, string][] = [
      ["oci-archive", `oci-archive:${f.ociArchive}:latest`],
      ["docker-archive", `docker-archive:${f.dockerArchive}`],
    ];
    if (!REGISTRY_UNAVAILABLE) {
      // Started before the proxy: the registry's own pipes are not the proxy's to close.
      const reg = await registry("plain");
      await reg.push(OCI, "inspect/base:latest");
      sources.push(["registry", reg.ref("inspect/base:latest")]);
    }
    await withProxy(server, async (proxy) => {
      const expected = await inspect(proxy, OCI);
      assert.equal(expected.motd, "welcome\n");
      assert.equal(expected.shell, "#!/bin/sh\necho hello\n");
      assert.ok(expected.listing.some(([path]) => path === "usr/share/big.bin"));
      for (const [name, ref] of sources) {
        assert.deepEqual(await inspect(proxy, ref), expected, name);
      }
    }, { insecureSkipTlsVerification: true });
  });
}

test("platforms lists a multi-arch image in a real registry, and --platform reads each one", {
  skip: registrySkip || (SERVERS.length === 0 ? "no skopeo" : false),
}, async () => {
  const reg = await registry("plain");
  await reg.push(`oci:${f.multiLayout}:latest`, "inspect/multi:latest", { copyArgs: ["--all"] });
  const ref = reg.ref("inspect/multi:latest");
  for (const server of SERVERS) {
    const cli = (...args: string[]) =>
      runCli(["--skopeo", server.skopeoCmd.join(" "), "--tls-verify=false", ...args]);
    const listed = cli("platforms", ref);
    assert.equal(listed.status, 0, listed.stderr);
    assert.equal(
      listed.text,
      `linux/amd64 ${f.multi.amd64.manifest.digest}\nlinux/arm64 ${f.multi.arm64.manifest.digest}\n`,
      server.name,
    );
    const arm = cli("--platform", "linux/arm64", "cat", ref, "arch");
    assert.equal(arm.status, 0, arm.stderr);
    assert.equal(arm.text, "arm64\n");
  }
});
