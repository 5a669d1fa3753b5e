import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { SERVERS } from "./helpers/env.ts";
import { type CliResult, runCli, tempDir } from "./helpers/cli-helpers.ts";
import { debPackage, debTar, stackedImage, unpackWithGnuTar } from "./helpers/stacked.ts";

const stacked = stackedImage();
const skip = "skip" in stacked ? stacked.skip : false;
const REF = "skip" in stacked ? "" : stacked.ref;

function assertFailed(result: CliResult, pattern: RegExp, status = 1): void {
  assert.equal(result.status, status, `status; stderr: ${result.stderr}`);
  const lines = result.stderr.trimEnd().split("\n");
  if (status === 1) assert.equal(lines.length, 1, `one line on stderr, got: ${result.stderr}`);
  assert.match(lines[0], /^error: /);
  assert.match(lines[0], pattern);
}

function assertOk(result: CliResult): void {
  assert.equal(result.status, 0, `status; stderr: ${result.stderr}`);
  assert.equal(result.stderr, "");
}

/** A directory's time as GNU tar lists it after unpacking is not the layer's (see view_test.ts). */
function maskDirectoryTimes(lines: string[]): string[] {
  return lines.map((l) => l.startsWith("d") ? l.replace(/\d{4}-\d\d-\d\d \d\d:\d\d/, "TIME") : l);
}

for (const server of SERVERS) {
  const cli = (...args: string[]) => runCli(["--skopeo", server.skopeoCmd.join(" "), ...args]);

  test(
    `ls prints the final file system as tar -tv lists the same tree unpacked by GNU tar (${server.name})`,
    { skip },
    () => {
      if ("skip" in stacked) return;
      const reference = tempDir("ls-reference");
      unpackWithGnuTar(stacked.tars, reference);
      const listing = execFileSync(
        "sh",
        ["-c", 'tar -C "$1" --sort=name -cf - . | tar -tv --numeric-owner -f -', "sh", reference],
        { env: { ...process.env, TZ: "UTC" }, maxBuffer: 64 << 20 },
      ).toString().split("\n").filter((l) => l !== "" && !l.endsWith(" ./")).map((l) =>
        l.replace(" ./", " ").replace(" link to ./", " link to ")
      );
      const result = cli("ls", REF);
      assertOk(result);
      assert.deepEqual(maskDirectoryTimes(result.text.trimEnd().split("\n")), maskDirectoryTimes(listing));
    },
  );

  test(
    `ls --json prints one object per line with the layer each path comes from (${server.name})`,
    { skip },
    () => {
      const result = cli("ls", REF, "/opt", "--json");
      assertOk(result);
      const lines = result.text.trimEnd().split("\n").map((l) => JSON.parse(l));
      assert.deepEqual(
        lines.map((l) => [l.path, l.type, l.mode, l.uid, l.gid, l.size, l.linkname, l.layer]),
        [
          ["opt", "dir", 0o755, 0, 0, 0, "", 3],
          ["opt/kept", "file", 0o644, 0, 0, 19, "", 2],
          ["opt/kept-too", "hardlink", 0o644, 0, 0, 0, "opt/kept", 2],
          ["opt/replaced", "file", 0o644, 0, 0, 16, "", 3],
          ["opt/survivor", "file", 0o640, 0, 0, 40, "", 2],
        ],
      );
      assert.ok(lines.every((l) => typeof l.mtime === "number" && l.mtime > 1.7e9));
    },
  );

  test(`cat writes one file's bytes, following symlinks inside the image (${server.name})`, { skip }, () => {
    const deb = debPackage("tzdata");
    if ("skip" in deb) return;
    const zone = execFileSync("tar", ["-xOf", "-", "./usr/share/zoneinfo/Asia/Tokyo"], {
      input: debTar(deb.path),
    });
    const result = cli("cat", REF, "/srv/zones/Asia/Tokyo");
    assertOk(result);
    assert.deepEqual(result.stdout, new Uint8Array(zone));
    assert.equal(cli("cat", REF, "srv/escape").text, "99.9\n");
  });

  test(
    `cat and ls fail with exit status 1 and one error line for a missing path or a directory (${server.name})`,
    { skip },
    () => {
      assertFailed(cli("cat", REF, "etc/host.conf"), /No such file in the image: "etc\/host.conf"/);
      assertFailed(cli("cat", REF, "etc"), /"etc": it is a directory/);
      assertFailed(cli("cat", REF, "srv/loop-a"), /more than 40 symlinks/);
      assertFailed(cli("ls", REF, "usr/share/zoneinfo/Africa"), /No such file in the image/);
    },
  );
}

test("ls and cat reject bad usage with exit status 2", () => {
  assertFailed(runCli(["cat", "oci:/nowhere:latest"]), /missing PATH/, 2);
  assertFailed(runCli(["ls", "oci:/nowhere:latest", "a", "b"]), /unexpected argument "b"/, 2);
  assertFailed(runCli(["cat", "oci:/nowhere:latest", "a", "--json"]), /unknown option --json/, 2);
  assertFailed(runCli(["ls", "oci:/nowhere:latest", "--json=yes"]), /takes no value/, 2);
});
