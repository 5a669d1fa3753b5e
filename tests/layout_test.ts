import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ImageProxy, ImageReference } from "../mod.ts";
import { layoutTag, REF_NAME_ANNOTATION, writeLayout } from "../src/image/layout.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import { SERVERS } from "./helpers/env.ts";
import { digestOf, runCli, tempDir } from "./helpers/cli-helpers.ts";
import { withoutFileSinks } from "./helpers/proxy.ts";

const f = buildFixtures();
const REF = `oci:${f.layout}:latest`;

/** The system skopeo, any version: an independent reader of what we wrote. */
function skopeo(...args: string[]): string {
  return execFileSync("skopeo", ["--insecure-policy", ...args], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
  });
}

function blobNames(dir: string): string[] {
  return readdirSync(join(dir, "blobs", "sha256")).sort();
}

interface FetchSummary {
  digest: string;
  sourceDigest: string;
  tag: string;
  config: { skipped: boolean };
  layers: { digest: string; skipped: boolean; mediaType: string; compression: string }[];
  bytesFetched: number;
  notes: string[];
}

for (const server of SERVERS) {
  const skopeoFlag = ["--skopeo", server.skopeoCmd.join(" ")];

  test(`fetch --output writes a layout that skopeo inspect and skopeo copy read (${server.name})`, () => {
    const dir = join(tempDir("layout"), "out");
    const result = runCli([...skopeoFlag, "fetch", REF, "--output", dir]);
    assert.equal(result.status, 0, result.stderr);
    const summary = result.json() as FetchSummary;
    assert.equal(summary.digest, f.image.manifest.digest, "an OCI source keeps its manifest bytes");
    assert.deepEqual(summary.notes, []);
    assert.deepEqual(JSON.parse(readFileSync(join(dir, "oci-layout"), "utf8")), {
      imageLayoutVersion: "1.0.0",
    });
    const index = JSON.parse(readFileSync(join(dir, "index.json"), "utf8"));
    assert.equal(index.manifests.length, 1);
    assert.equal(index.manifests[0].digest, f.image.manifest.digest);
    assert.equal(index.manifests[0].annotations[REF_NAME_ANNOTATION], "latest");
    const inspected = JSON.parse(skopeo("inspect", `oci:${dir}:latest`));
    assert.equal(inspected.Digest, f.image.manifest.digest);
    assert.deepEqual(inspected.Layers, f.image.layers.map((l) => l.digest));
    const copy = join(tempDir("layout-copy"), "dir");
    skopeo("copy", "-q", `oci:${dir}:latest`, `dir:${copy}`);
    for (const layer of f.image.layers) {
      assert.deepEqual(new Uint8Array(readFileSync(join(copy, layer.digest.slice(7)))), layer.data);
    }
    assert.deepEqual(
      new Uint8Array(readFileSync(join(dir, "blobs", "sha256", f.image.config.digest.slice(7)))),
      f.image.configBytes,
      "the config blob itself, not GetFullConfig's re-serialization",
    );
    assert.deepEqual(
      blobNames(dir),
      [f.image.manifest, f.image.config, ...f.image.layers].map((b) => b.digest.slice(7)).sort(),
      "no temporary files left",
    );
  });

  test(`a second fetch skips blobs already present and refetches a damaged one (${server.name})`, () => {
    const dir = join(tempDir("layout"), "out");
    assert.equal(runCli([...skopeoFlag, "fetch", REF, "-o", dir]).status, 0);
    const again = runCli([...skopeoFlag, "fetch", REF, "-o", dir]);
    assert.equal(again.status, 0, again.stderr);
    const summary = again.json() as FetchSummary;
    assert.equal(summary.config.skipped, true);
    assert.deepEqual(summary.layers.map((l) => l.skipped), [true, true]);
    assert.equal(summary.bytesFetched, 0);
    // Same size, wrong content: found by its digest and fetched again.
    const victim = join(dir, "blobs", "sha256", f.image.layers[0].digest.slice(7));
    const bytes = readFileSync(victim);
    bytes[10] ^= 0xff;
    writeFileSync(victim, bytes);
    const repaired = runCli([...skopeoFlag, "fetch", REF, "-o", dir]).json() as FetchSummary;
    assert.deepEqual(repaired.layers.map((l) => l.skipped), [false, true]);
    assert.equal(digestOf(readFileSync(victim)), f.image.layers[0].digest);
  });

  test(`a fetch whose layer fails verification leaves no blob under its final name (${server.name})`, () => {
    const dir = join(tempDir("layout"), "out");
    const result = runCli([...skopeoFlag, "fetch", `oci:${f.tamperedLayout}:latest`, "-o", dir]);
    assert.equal(result.status, 1);
    assert.match(result.stderr, /^error: .*(corrupted|digest)/);
    const tampered = f.image.layers[1].digest.slice(7);
    const names = blobNames(dir);
    assert.ok(!names.includes(tampered), "the corrupted layer was not renamed into place");
    assert.ok(!names.some((n) => n.includes("partial")), `temporary files removed: ${names}`);
    assert.ok(!existsSync(join(dir, "index.json")), "no index: the layout does not claim the image");
  });

  test(`an aborted fetch removes its partial blob and writes no index (${server.name})`, async () => {
    const dir = join(tempDir("layout"), "out");
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const image = await proxy.openImage(REF);
    const controller = new AbortController();
    await assert.rejects(
      writeLayout(proxy, image, dir, {
        signal: controller.signal,
        concurrency: 1, // one blob at a time, so that the first layer is complete when the abort comes
        onProgress: (p) => {
          if (p.layer === 2 && p.layerBytes > 0) controller.abort(new Error("stop"));
        },
      }),
      /stop/,
    );
    const names = blobNames(dir);
    assert.ok(!names.includes(f.image.layers[1].digest.slice(7)));
    assert.ok(!names.some((n) => n.includes("partial")), `temporary files removed: ${names}`);
    assert.ok(!existsSync(join(dir, "index.json")));
    // The proxy survives the abort, and the next fetch completes the layout.
    const result = await writeLayout(proxy, image, dir);
    assert.deepEqual(result.layers.map((l) => l.skipped), [true, false]);
  });

  test(`fetch of a docker-archive stores the converted manifest and says so (${server.name})`, () => {
    const dir = join(tempDir("layout"), "out");
    const result = runCli([
      ...skopeoFlag,
      "fetch",
      `docker-archive:${f.dockerArchive}:fixture/base:latest`,
      "-o",
      dir,
    ]);
    assert.equal(result.status, 0, result.stderr);
    const summary = result.json() as FetchSummary;
    assert.equal(summary.tag, "latest");
    assert.notEqual(summary.digest, summary.sourceDigest);
    assert.match(summary.notes[0], /converted the source manifest/);
    assert.deepEqual(summary.layers.map((l) => [l.compression, l.mediaType]), [
      ["none", "application/vnd.oci.image.layer.v1.tar"],
      ["none", "application/vnd.oci.image.layer.v1.tar"],
    ]);
    const manifestBytes = readFileSync(join(dir, "blobs", "sha256", summary.digest.slice(7)));
    assert.equal(digestOf(manifestBytes), summary.digest);
    const inspected = JSON.parse(skopeo("inspect", `oci:${dir}:latest`));
    assert.equal(inspected.Digest, summary.digest);
    skopeo("copy", "-q", `oci:${dir}:latest`, `dir:${join(tempDir("layout-copy"), "dir")}`);
  });

  test(`one layout keeps several tags (${server.name})`, async () => {
    const dir = join(tempDir("layout"), "out");
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const image = await proxy.openImage(REF);
    await writeLayout(proxy, image, dir, { tag: "one" });
    const second = await writeLayout(proxy, image, dir, { tag: "two" });
    assert.equal(second.config.skipped, true);
    const index = JSON.parse(readFileSync(join(dir, "index.json"), "utf8"));
    assert.deepEqual(
      index.manifests.map((m: { annotations: Record<string, string> }) => m.annotations[REF_NAME_ANNOTATION]),
      ["one", "two"],
    );
    await writeLayout(proxy, image, dir, { tag: "one" });
    assert.equal(
      JSON.parse(readFileSync(join(dir, "index.json"), "utf8")).manifests.length,
      2,
      "a tag is replaced",
    );
    assert.equal(JSON.parse(skopeo("inspect", `oci:${dir}:two`)).Digest, f.image.manifest.digest);
  });

  test(`writeLayout streams blobs through a transport that cannot save them, to the same layout (${server.name})`, async () => {
    const saved = join(tempDir("layout"), "saved");
    const streamed = join(tempDir("layout"), "streamed");
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    assert.equal(proxy.canSaveBlobs, true);
    const one = await writeLayout(proxy, await proxy.openImage(REF), saved);
    await using plain = await ImageProxy.spawn({
      skopeoCmd: server.skopeoCmd,
      transport: await withoutFileSinks(),
    });
    assert.equal(plain.canSaveBlobs, false);
    const two = await writeLayout(plain, await plain.openImage(REF), streamed);
    assert.deepEqual(two, { ...one, path: streamed });
    assert.deepEqual(blobNames(streamed), blobNames(saved));
    for (const name of blobNames(saved)) {
      assert.deepEqual(
        readFileSync(join(streamed, "blobs", "sha256", name)),
        readFileSync(join(saved, "blobs", "sha256", name)),
      );
    }
  });

  if (server.protocol === "0.2.8") {
    test(`fetch --raw-blobs writes the same layout as GetBlob (${server.name})`, () => {
      const dir = join(tempDir("layout"), "out");
      const result = runCli([...skopeoFlag, "fetch", "--raw-blobs", REF, "-o", dir]);
      assert.equal(result.status, 0, result.stderr);
      assert.equal(JSON.parse(skopeo("inspect", `oci:${dir}:latest`)).Digest, f.image.manifest.digest);
      for (const layer of f.image.layers) {
        assert.equal(
          digestOf(readFileSync(join(dir, "blobs", "sha256", layer.digest.slice(7)))),
          layer.digest,
        );
      }
    });
  }
}

test("layoutTag takes the reference's tag, or latest", () => {
  const cases: [string, string][] = [
    ["docker://quay.io/fedora/fedora:40", "40"],
    ["docker://localhost:5000/app", "latest"],
    [`docker://quay.io/app@sha256:${"a".repeat(64)}`, "latest"],
    ["oci:/srv/layout:v2", "v2"],
    ["oci:/srv/layout", "latest"],
    ["oci-archive:/x.tar:stable", "stable"],
    ["docker-archive:/x.tar:example.com/app:1.0", "1.0"],
    ["docker-archive:/x.tar", "latest"],
    ["dir:/srv/dir", "latest"],
    ["containers-storage:[overlay@/var/lib]registry.example/app:edge", "edge"],
  ];
  for (const [reference, tag] of cases) {
    assert.equal(layoutTag(ImageReference.parse(reference)), tag, reference);
  }
});
