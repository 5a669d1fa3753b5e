// The README's example script runs, unchanged, under the runtime running the tests (so CI runs the Bun
// script under Bun and the same file under Deno and under Node).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { buildFixtures } from "./helpers/fixtures.ts";
import { ROOT, RUNTIME, scriptCommand, SERVERS } from "./helpers/env.ts";

const fixtures = buildFixtures();
const SCRIPT = join(ROOT, "examples", "fetch-layers.ts");

for (const server of SERVERS) {
  test(`the README's example streams and verifies every layer under ${RUNTIME} (${server.name})`, () => {
    const command = scriptCommand(SCRIPT, ["--allow-ffi", "--allow-run", "--allow-env=SKOPEO"]);
    const ref = `oci:${fixtures.layout}:latest`;
    const result = spawnSync(command[0], [...command.slice(1), ref], {
      env: { ...process.env, SKOPEO: server.skopeoCmd.join(" "), NO_COLOR: "1" },
      encoding: "utf8",
      timeout: 60_000,
    });
    assert.equal(result.status, 0, result.stderr);
    const lines = result.stdout.trim().split("\n");
    assert.equal(lines[0], `${ref} ${fixtures.image.manifest.digest} (protocol ${server.protocol})`);
    assert.deepEqual(
      lines.slice(1),
      fixtures.image.layers.map((l) => `${l.digest} ${l.size} bytes verified`),
    );
  });
}

const INSPECT = join(ROOT, "examples", "inspect-image.ts");

for (const server of SERVERS) {
  test(`the inspect example lists /etc and prints a file under ${RUNTIME} (${server.name})`, () => {
    const command = scriptCommand(INSPECT, ["--allow-ffi", "--allow-run", "--allow-env=SKOPEO"]);
    const result = spawnSync(command[0], [...command.slice(1), `oci:${fixtures.layout}:latest`, "/bin/sh"], {
      env: { ...process.env, SKOPEO: server.skopeoCmd.join(" "), NO_COLOR: "1" },
      encoding: "utf8",
      timeout: 60_000,
    });
    assert.equal(result.status, 0, result.stderr);
    assert.equal(
      result.stdout,
      "dir etc 0 (layer 1)\nfile etc/motd 8 (layer 1)\nfile etc/os-release 34 (layer 0)\n" +
        "#!/bin/sh\necho hello\n\n",
    );
  });
}
