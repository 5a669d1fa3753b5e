// A hostile source or a hostile output folder must not make `fetch --output` (writeLayout) write, read
// or reveal anything outside the layout folder: digests are checked before they become paths, and
// links planted inside the folder are refused, never followed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { contentDigestProblem, digestProblem, ImageProxy, LayoutError, ProtocolError } from "../mod.ts";
import { REF_NAME_ANNOTATION, writeLayout } from "../src/image/layout.ts";
import type { ChildExit, ReceivedPacket, Transport } from "../src/transport.ts";
import { buildFixtures, tar } from "./helpers/fixtures.ts";
import { SERVERS } from "./helpers/env.ts";
import {
  cliCommand,
  type CliResult,
  digestOf,
  layer,
  runCli,
  tempDir,
  writeOciLayout,
} from "./helpers/cli-helpers.ts";
import { checkLayerInfo, checkManifest } from "../src/oci.ts";

const f = buildFixtures();
const REF = `oci:${f.layout}:latest`;
const SECRET = "TOPSECRET-root:$6$not-for-your-eyes";

/** Whether `text` holds a C0, DEL or C1 control character. */
function hasControlCharacter(text: string): boolean {
  return [...text].some((c) =>
    c.charCodeAt(0) < 0x20 || (c.charCodeAt(0) >= 0x7f && c.charCodeAt(0) <= 0x9f)
  );
}

/** Asserts exit status 1 with exactly one `error:` line on stderr, matching `pattern`. */
function assertOneError(result: CliResult, pattern: RegExp): void {
  assert.equal(result.status, 1, `status; stderr: ${result.stderr}`);
  const lines = result.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `one line on stderr, got: ${result.stderr}`);
  assert.match(lines[0], /^error: /);
  assert.match(lines[0], pattern);
}

/**
 * An `oci:` layout whose manifest (a valid blob, so skopeo serves it) names its first layer with
 * `digest`; the layer bytes stay under their real name.
 */
function layoutWithLayerDigest(digest: string): string {
  const dir = join(tempDir("hostile-source"), "layout");
  const { manifestDigest } = writeOciLayout(dir, [layer(tar([{ name: "a", content: "a\n" }]), "gzip")]);
  const blobs = join(dir, "blobs", "sha256");
  const manifest = JSON.parse(readFileSync(join(blobs, manifestDigest.slice(7)), "utf8"));
  manifest.layers[0].digest = digest;
  const text = JSON.stringify(manifest);
  const crafted = digestOf(text);
  writeFileSync(join(blobs, crafted.slice(7)), text);
  writeFileSync(
    join(dir, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        digest: crafted,
        size: new TextEncoder().encode(text).length,
        annotations: { [REF_NAME_ANNOTATION]: "latest" },
      }],
    }),
  );
  return dir;
}

/** A folder next to the layout that nothing may touch, with one file in it. */
function bystander(root: string): { dir: string; file: string } {
  const dir = join(root, "bystander");
  mkdirSync(dir);
  const file = join(dir, "secret.txt");
  writeFileSync(file, SECRET);
  return { dir, file };
}

function assertUntouched(place: { dir: string; file: string }): void {
  assert.deepEqual(readdirSync(place.dir), ["secret.txt"], "nothing was written next to the secret");
  assert.equal(readFileSync(place.file, "utf8"), SECRET, "the secret is unchanged");
}

for (const server of SERVERS) {
  const skopeo = ["--skopeo", server.skopeoCmd.join(" ")];

  test(`fetch --output refuses a layer digest that climbs out of the layout, before creating anything (${server.name})`, () => {
    const root = tempDir("escape");
    const outside = join(root, "outside");
    // From DIR/blobs/ALGORITHM/, enough ".." to reach the root, then back down to `outside`.
    const climb = `${"../".repeat(16)}${outside.slice(1)}`;
    const source = layoutWithLayerDigest(`${climb}/x:${"a".repeat(64)}`);
    const dir = join(root, "out");
    const result = runCli([...skopeo, "fetch", `oci:${source}:latest`, "--output", dir]);
    assertOneError(result, /layer 0 digest is invalid: .* is not a sha256 or sha512 digest/);
    assert.ok(!existsSync(outside), "no folder was created outside the layout");
    assert.ok(!existsSync(dir), "nothing was written: the manifest is checked first");
  });

  test(`metadata, layers and fetch refuse a manifest whose digest is not lowercase hex of the right length (${server.name})`, () => {
    for (
      const digest of [
        `sha256:${"A".repeat(64)}`,
        `sha256:${"a".repeat(63)}`,
        `sha512:${"a".repeat(64)}`,
        `md5:${"a".repeat(32)}`,
        `sha256:${"a".repeat(64)}\n\x1b[2J`,
      ]
    ) {
      const ref = `oci:${layoutWithLayerDigest(digest)}:latest`;
      for (const command of ["metadata", "layers", "fetch"]) {
        const result = runCli([...skopeo, command, ref]);
        assertOneError(result, /digest is invalid/);
        assert.equal(result.stdout.length, 0, `${command} printed nothing for ${JSON.stringify(digest)}`);
      }
    }
  });

  test(`writeLayout rejects a climbing digest with a ProtocolError and writes nothing (${server.name})`, async () => {
    const root = tempDir("escape-lib");
    const source = layoutWithLayerDigest(`${"../".repeat(16)}${root.slice(1)}/outside:${"b".repeat(64)}`);
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const image = await proxy.openImage(`oci:${source}:latest`);
    await assert.rejects(writeLayout(proxy, image, join(root, "out")), ProtocolError);
    assert.deepEqual(readdirSync(root), []);
  });

  test(`fetch --output refuses a symbolic link planted at blobs/sha256 and writes nothing through it (${server.name})`, () => {
    const root = tempDir("planted");
    const place = bystander(root);
    const dir = join(root, "out");
    mkdirSync(join(dir, "blobs"), { recursive: true });
    symlinkSync(place.dir, join(dir, "blobs", "sha256"));
    const result = runCli([...skopeo, "fetch", REF, "--output", dir]);
    assertOneError(result, /blobs\/sha256" is a symbolic link/);
    assertUntouched(place);
  });

  test(`fetch --output refuses a symbolic link planted at blobs and writes nothing through it (${server.name})`, () => {
    const root = tempDir("planted");
    const place = bystander(root);
    const dir = join(root, "out");
    mkdirSync(dir);
    symlinkSync(place.dir, join(dir, "blobs"));
    const result = runCli([...skopeo, "fetch", REF, "--output", dir]);
    assertOneError(result, /blobs" is a symbolic link/);
    assertUntouched(place);
  });

  test(`fetch --output refuses an oci-layout link without showing what its target holds (${server.name})`, () => {
    const root = tempDir("planted");
    const place = bystander(root);
    const dir = join(root, "out");
    mkdirSync(dir);
    symlinkSync(place.file, join(dir, "oci-layout"));
    const result = runCli([...skopeo, "fetch", REF, "--output", dir]);
    assertOneError(result, /oci-layout" is a symbolic link/);
    assert.ok(!result.stderr.includes("TOPSECRET"), `the target's content is not shown: ${result.stderr}`);
    assertUntouched(place);
  });

  test(`fetch --output refuses an invalid oci-layout file without quoting it (${server.name})`, () => {
    const dir = join(tempDir("planted"), "out");
    mkdirSync(dir);
    writeFileSync(join(dir, "oci-layout"), SECRET);
    const result = runCli([...skopeo, "fetch", REF, "--output", dir]);
    assertOneError(result, /oci-layout" is not a valid oci-layout file/);
    assert.ok(!result.stderr.includes("TOPSECRET"), `the file's content is not shown: ${result.stderr}`);
  });

  test(`fetch --output refuses a FIFO planted at oci-layout instead of blocking on it (${server.name})`, () => {
    const dir = join(tempDir("planted"), "out");
    mkdirSync(dir);
    execFileSync("mkfifo", [join(dir, "oci-layout")]);
    // A CLI blocked on the FIFO ignores SIGTERM while it waits: kill it outright if it hangs.
    const [command, ...prefix] = cliCommand();
    const run = spawnSync(command, [...prefix, ...skopeo, "fetch", REF, "--output", dir], {
      encoding: "utf8",
      timeout: 30_000,
      killSignal: "SIGKILL",
    });
    assert.equal(run.signal, null, "the command finished by itself");
    assert.equal(run.status, 1, run.stderr);
    assert.match(run.stderr, /^error: .*oci-layout" is not a regular file\n$/);
  });

  test(`fetch --output refuses an index.json link, leaving its target as it was (${server.name})`, () => {
    const root = tempDir("planted");
    const target = join(root, "elsewhere.json");
    const index = JSON.stringify({ schemaVersion: 2, manifests: [] });
    writeFileSync(target, index);
    const dir = join(root, "out");
    mkdirSync(dir);
    symlinkSync(target, join(dir, "index.json"));
    const result = runCli([...skopeo, "fetch", REF, "--output", dir]);
    assertOneError(result, /index\.json" is a symbolic link/);
    assert.equal(readFileSync(target, "utf8"), index);
  });

  test(`fetch --output refuses a link planted under a blob's name, leaving its target as it was (${server.name})`, () => {
    const root = tempDir("planted");
    const place = bystander(root);
    const dir = join(root, "out");
    mkdirSync(join(dir, "blobs", "sha256"), { recursive: true });
    const name = join(dir, "blobs", "sha256", f.image.layers[1].digest.slice(7));
    symlinkSync(place.file, name);
    const result = runCli([...skopeo, "fetch", REF, "--output", dir]);
    assertOneError(result, new RegExp(`${f.image.layers[1].digest.slice(7)}" is a symbolic link`));
    assertUntouched(place);
  });

  test(`writeLayout throws a LayoutError naming the planted link (${server.name})`, async () => {
    const root = tempDir("planted-lib");
    const place = bystander(root);
    const dir = join(root, "out");
    mkdirSync(dir);
    symlinkSync(place.file, join(dir, "oci-layout"));
    await using proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd });
    const image = await proxy.openImage(REF);
    await assert.rejects(writeLayout(proxy, image, dir), (err: unknown) => {
      assert.ok(err instanceof LayoutError, String(err));
      assert.equal(err.path, join(dir, "oci-layout"));
      assert.ok(!err.message.includes("TOPSECRET"));
      return true;
    });
    assertUntouched(place);
  });
}

test("contentDigestProblem accepts only sha256 and sha512 in lowercase hex of the exact length", () => {
  assert.equal(contentDigestProblem(`sha256:${"0".repeat(64)}`), undefined);
  assert.equal(contentDigestProblem(`sha512:${"f".repeat(128)}`), undefined);
  for (
    const bad of [
      `sha256:${"0".repeat(63)}`,
      `sha256:${"0".repeat(65)}`,
      `sha256:${"A".repeat(64)}`,
      `sha512:${"0".repeat(64)}`,
      `sha384:${"0".repeat(96)}`,
      `../sha256:${"0".repeat(64)}`,
      `sha256:../${"0".repeat(61)}`,
      `constructor:${"0".repeat(64)}`,
      `__proto__:${"0".repeat(64)}`,
      "",
      5,
      null,
    ]
  ) {
    assert.equal(typeof contentDigestProblem(bad), "string", JSON.stringify(bad));
  }
  // The reason quotes the value as JSON: a newline or an ESC in it cannot break a message's line.
  const reason = contentDigestProblem(`x\n\x1b[2J:${"0".repeat(64)}`)!;
  assert.ok(!hasControlCharacter(reason), reason);
});

test("digestProblem does not throw for an algorithm named after an Object member", () => {
  for (const name of ["constructor", "toString", "__proto__", "hasOwnProperty"]) {
    assert.doesNotThrow(() => digestProblem(`${name}:${"0".repeat(64)}`), name);
  }
});

test("checkManifest and checkLayerInfo refuse descriptors with digests that are not safe file names", () => {
  const good = {
    mediaType: "application/vnd.oci.image.layer.v1.tar",
    digest: `sha256:${"1".repeat(64)}`,
    size: 1,
  };
  const manifest = (config: object, layers: object[]) => ({ schemaVersion: 2, config, layers });
  assert.doesNotThrow(() => checkManifest(manifest(good, [good])));
  const bad = { ...good, digest: `../../etc:${"1".repeat(64)}` };
  assert.throws(() => checkManifest(manifest(bad, [good])), /config digest is invalid/);
  assert.throws(() => checkManifest(manifest(good, [good, bad])), /layer 1 digest is invalid/);
  assert.throws(() => checkManifest(manifest(good, [bad])), ProtocolError);
  const info = (digest: string) => [{ digest, size: 1, media_type: good.mediaType }];
  assert.doesNotThrow(() => checkLayerInfo(info(good.digest)));
  assert.throws(() => checkLayerInfo(info(bad.digest)), ProtocolError);
});

/**
 * A scripted peer (no real skopeo sends this) that answers GetManifest with `digest` and a valid
 * manifest on a pipe.
 */
function peerReturningDigest(digest: string): Transport {
  let exit: (value: ChildExit) => void = () => {};
  const exited = new Promise<ChildExit>((resolve) => exit = resolve);
  const manifest = new TextEncoder().encode(JSON.stringify({
    schemaVersion: 2,
    config: {
      mediaType: "application/vnd.oci.image.config.v1+json",
      digest: `sha256:${"2".repeat(64)}`,
      size: 2,
    },
    layers: [],
  }));
  const reply = (value: unknown, pipeid = 0, fds: number[] = []): ReceivedPacket => ({
    data: new TextEncoder().encode(JSON.stringify({ success: true, value, pipeid, error: "" })),
    fds,
  });
  const answer = (packet: Uint8Array): ReceivedPacket => {
    const { method } = JSON.parse(new TextDecoder().decode(packet));
    if (method === "Initialize") return reply("0.2.8");
    if (method === "OpenImage") return reply(1);
    if (method === "GetManifest") return reply(digest, 9, [1009]);
    return reply(null);
  };
  const done = () => exit({ code: 0, signal: null, stderrTail: "", killed: false });
  return {
    request: (packet) => Promise.resolve(answer(packet)),
    send: () => Promise.resolve(done()),
    openStream: () =>
      new ReadableStream({
        start(controller) {
          controller.enqueue(manifest);
          controller.close();
        },
      }),
    closeFd: () => {},
    exited,
    close: () => {
      done();
      return exited;
    },
  };
}

test("a manifest digest from the proxy holding a newline or escape codes is a ProtocolError", async () => {
  const good = `sha256:${"3".repeat(64)}`;
  for (
    const digest of [`${good}\n\x1b]0;owned\x07`, `sha256:${"3".repeat(63)}\x1b`, `../x:${"3".repeat(64)}`]
  ) {
    const transport = peerReturningDigest(digest);
    await using proxy = await ImageProxy.spawn({ transport: { spawn: () => Promise.resolve(transport) } });
    const image = await proxy.openImage("oci:/scripted:latest");
    await assert.rejects(proxy.fetchManifestRaw(image), (err: unknown) => {
      assert.ok(err instanceof ProtocolError, String(err));
      assert.match(err.message, /digest GetManifest returned is invalid/);
      assert.ok(!hasControlCharacter(err.message), err.message);
      return true;
    });
  }
  const transport = peerReturningDigest(good);
  await using proxy = await ImageProxy.spawn({ transport: { spawn: () => Promise.resolve(transport) } });
  const { digest } = await proxy.fetchManifest(await proxy.openImage("oci:/scripted:latest"));
  assert.equal(digest, good, "a valid digest passes");
});
