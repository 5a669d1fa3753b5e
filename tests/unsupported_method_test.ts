// A feature that needs a method the running proxy lacks fails with UnsupportedMethodError, whichever
// entry point asked for it, so a caller can catch that one class and tell the user which skopeo to get.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { ProxyTooOldError, UnsupportedMethodError } from "../mod.ts";
import { writeLayout } from "../src/image/layout.ts";
import { type CommandContext, HANDLERS } from "../src/cli/commands.ts";
import { parseArgs } from "../src/cli/args.ts";
import type { CliIo } from "../src/cli/io.ts";
import { ProgressLine } from "../src/cli/progress.ts";
import { FIRST_SKOPEO_RELEASE } from "../src/versions.ts";
import { buildFixtures } from "./helpers/fixtures.ts";
import { OLD_SERVER } from "./helpers/env.ts";
import { tempDir } from "./helpers/cli-helpers.ts";
import { withProxy } from "./helpers/proxy.ts";

const f = buildFixtures();
const REF = `oci:${f.layout}:latest`;

/** What every such error must say: the method, the version it needs, the skopeo that has it. */
function assertNeedsRawBlob(err: unknown, lead: RegExp): true {
  assert.ok(err instanceof UnsupportedMethodError, `expected UnsupportedMethodError, got ${err}`);
  assert.equal(err.method, "GetRawBlob");
  assert.equal(err.requiredVersion, "0.2.8");
  assert.equal(err.protocolVersion, "0.2.3");
  assert.match(err.message, lead);
  assert.match(
    err.message,
    /GetRawBlob, which needs proxy protocol version 0\.2\.8 or newer \(skopeo 1\.19 or newer\)/,
  );
  assert.match(err.message, /but this proxy speaks 0\.2\.3$/);
  return true;
}

const old = OLD_SERVER;
test("writeLayout with rawBlobs on a proxy without GetRawBlob throws UnsupportedMethodError", {
  skip: old ? false : "no protocol 0.2.3 skopeo on this machine",
}, async () => {
  await withProxy(old!, async (proxy) => {
    const image = await proxy.openImage(REF);
    const dir = join(tempDir("unsupported-layout"), "out");
    await assert.rejects(
      writeLayout(proxy, image, dir, { rawBlobs: true }),
      (err) => assertNeedsRawBlob(err, /^Option "rawBlobs" needs GetRawBlob/),
    );
    await proxy.closeImage(image);
  });
});

test("fetch --raw-blobs on a proxy without GetRawBlob throws UnsupportedMethodError", {
  skip: old ? false : "no protocol 0.2.3 skopeo on this machine",
}, async () => {
  await withProxy(old!, async (proxy) => {
    const image = await proxy.openImage(REF);
    const io: CliIo = {
      args: [],
      writeStdout: () => Promise.resolve(),
      writeStderr: () => {},
      stderrIsTerminal: false,
      columns: () => 80,
      now: () => performance.now(),
      onInterrupt: () => () => {},
    };
    const ctx: CommandContext = {
      proxy,
      image,
      args: parseArgs(["fetch", REF, "--raw-blobs"]),
      io,
      progress: new ProgressLine({ write: () => {}, columns: io.columns, now: io.now }, false),
      signal: new AbortController().signal,
    };
    await assert.rejects(
      HANDLERS.fetch(ctx),
      (err) => assertNeedsRawBlob(err, /^--raw-blobs needs GetRawBlob/),
    );
    await proxy.closeImage(image);
  });
});

test("version messages name the skopeo release from the one version table", () => {
  assert.equal(FIRST_SKOPEO_RELEASE["0.2.3"], "1.9");
  assert.match(
    new ProxyTooOldError("0.2.1", "0.2.3").message,
    /at least "0\.2\.3" is needed \(skopeo 1\.9 or newer\)$/,
  );
  assert.match(
    new UnsupportedMethodError("OpenImageOptional", "0.2.4", "0.2.3").message,
    /^Method "OpenImageOptional" needs proxy protocol version 0\.2\.4 or newer \(skopeo 1\.11 or newer\), but this proxy speaks 0\.2\.3$/,
  );
  assert.doesNotMatch(new UnsupportedMethodError("X", "0.9.9", "0.2.3").message, /skopeo/);
});
