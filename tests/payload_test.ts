// Small payloads (manifests, configurations) come back in arrays of their own size: a view into an
// adapter's large read buffer would keep the whole buffer alive for as long as the caller holds it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { buildFixtures } from "./helpers/fixtures.ts";
import { SERVERS } from "./helpers/env.ts";
import { withProxy } from "./helpers/proxy.ts";

const f = buildFixtures();
const REF = `oci:${f.layout}:latest`;

for (const server of SERVERS) {
  test(`fetchManifestRaw and fetchConfigRaw return bytes that own their buffer (${server.name})`, async () => {
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(REF);
      const { raw } = await proxy.fetchManifestRaw(image);
      assert.ok(raw.byteLength > 0);
      assert.equal(raw.buffer.byteLength, raw.byteLength, "the manifest's buffer is the manifest's size");
      const config = await proxy.fetchConfigRaw(image);
      assert.equal(config.buffer.byteLength, config.byteLength, "the config's buffer is the config's size");
      await proxy.closeImage(image);
    });
  });
}
