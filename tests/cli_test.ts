import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { buildFixtures, noise } from "./helpers/fixtures.ts";
import { SERVERS } from "./helpers/env.ts";
import { cliCommand, type CliResult, digestOf, runCli, tempDir } from "./helpers/cli-helpers.ts";
import { type CliIo, run } from "../src/cli/main.ts";
import { parseArgs, UsageError } from "../src/cli/args.ts";
import { formatBytes, ProgressLine } from "../src/cli/progress.ts";

const f = buildFixtures();
const REF = `oci:${f.layout}:latest`;
const [LAYER0, LAYER1] = f.image.layers;

/** Asserts a failure: the status, nothing but one `error:` line on stderr, matching `pattern`. */
function assertFailed(result: CliResult, pattern: RegExp, status = 1): void {
  assert.equal(result.status, status, `status; stderr: ${result.stderr}`);
  const lines = result.stderr.trimEnd().split("\n");
  if (status === 1) assert.equal(lines.length, 1, `one line on stderr, got: ${result.stderr}`);
  assert.match(lines[0], /^error: /);
  assert.match(lines[0], pattern);
}

function assertOk(result: CliResult): void {
  assert.equal(result.status, 0, `status; stderr: ${result.stderr}`);
  assert.equal(result.stderr, "", "no progress or messages on a non-terminal stderr");
}

for (const server of SERVERS) {
  const skopeo = ["--skopeo", server.skopeoCmd.join(" ")];
  const cli = (...args: string[]) => runCli([...skopeo, ...args]);

  test(`metadata prints the digest and the OCI manifest (${server.name})`, () => {
    const result = cli("metadata", REF);
    assertOk(result);
    const out = result.json() as { digest: string; manifest: { layers: { digest: string }[] } };
    assert.equal(out.digest, f.image.manifest.digest);
    assert.deepEqual(out.manifest.layers.map((l) => l.digest), [LAYER0.digest, LAYER1.digest]);
  });

  test(`config prints the image configuration (${server.name})`, () => {
    const result = cli("config", REF);
    assertOk(result);
    const out = result.json() as { architecture: string; rootfs: { diff_ids: string[] } };
    assert.equal(out.architecture, "amd64");
    assert.deepEqual(out.rootfs.diff_ids, [LAYER0.diffId, LAYER1.diffId]);
  });

  test(`layers prints digest, size and media type of every layer (${server.name})`, () => {
    const result = cli("layers", REF);
    assertOk(result);
    assert.deepEqual(
      result.json(),
      [LAYER0, LAYER1].map((l) => ({ digest: l.digest, size: l.size, media_type: l.mediaType })),
    );
  });

  test(`blob writes the verified blob bytes to stdout (${server.name})`, () => {
    const result = cli("blob", REF, LAYER1.digest, String(LAYER1.size));
    assertOk(result);
    assert.equal(result.stdout.length, LAYER1.size);
    assert.equal(digestOf(result.stdout), LAYER1.digest);
  });

  test(`blob fails with exit status 1 when the size is wrong (${server.name})`, () => {
    const result = cli("blob", REF, LAYER0.digest, String(LAYER0.size - 1));
    assertFailed(result, new RegExp(LAYER0.digest));
    assert.ok(result.stdout.length <= LAYER0.size - 1, "never more than the declared size on stdout");
  });

  test(`blob fails for a digest the image does not have (${server.name})`, () => {
    const result = cli("blob", REF, digestOf("not in the image"), "16");
    assertFailed(result, /GetBlob|not found|no such file|blob/i);
  });

  test(`blob fails with exit status 1 when the layer is corrupted on disk (${server.name})`, () => {
    const tampered = f.image.layers[1];
    const result = cli("blob", `oci:${f.tamperedLayout}:latest`, tampered.digest, String(tampered.size));
    assertFailed(result, /corrupted|digest/);
  });

  test(`blob refuses a malformed digest as bad usage (${server.name})`, () => {
    const result = cli("blob", REF, "sha256:xyz", "10");
    assertFailed(result, /invalid digest/, 2);
    assert.match(result.stderr, /^usage: image-proxy \[OPTIONS\] blob REF DIGEST SIZE/m);
  });

  test(`blob refuses a size that is not a number as bad usage (${server.name})`, () => {
    assertFailed(cli("blob", REF, LAYER0.digest, "12kb"), /invalid size "12kb"/, 2);
  });

  if (server.protocol === "0.2.8") {
    test(`blob-raw writes the blob verified on the client side (${server.name})`, () => {
      const result = cli("blob-raw", REF, LAYER1.digest);
      assertOk(result);
      assert.equal(digestOf(result.stdout), LAYER1.digest);
    });

    test(`blob-raw fails when the blob's content does not match its digest (${server.name})`, () => {
      const result = cli("blob-raw", `oci:${f.tamperedLayout}:latest`, f.image.layers[1].digest);
      assertFailed(result, /corrupted|digest/);
    });
  } else {
    test(`blob-raw fails clearly on a proxy without GetRawBlob (${server.name})`, () => {
      const result = cli("blob-raw", REF, LAYER1.digest);
      assertFailed(result, /GetRawBlob.*0\.2\.8.*0\.2\.3/);
      assert.equal(result.stdout.length, 0);
    });
  }

  test(`fetch without --output streams every layer and prints a summary (${server.name})`, () => {
    const result = cli("fetch", REF);
    assertOk(result);
    const out = result.json() as { digest: string; layers: { digest: string }[]; bytesFetched: number };
    assert.equal(out.digest, f.image.manifest.digest);
    assert.deepEqual(out.layers.map((l) => l.digest), [LAYER0.digest, LAYER1.digest]);
    assert.equal(out.bytesFetched, LAYER0.size + LAYER1.size + f.image.config.size);
  });

  test(`fetch fails with exit status 1 when a layer is corrupted (${server.name})`, () => {
    assertFailed(cli("fetch", `oci:${f.tamperedLayout}:latest`), /corrupted|digest/);
  });

  test(`fetch --output writes an OCI layout and prints where it is (${server.name})`, () => {
    const dir = join(tempDir("cli-fetch"), "layout");
    const result = cli("fetch", REF, "--output", dir);
    assertOk(result);
    const out = result.json() as { layout: string; digest: string };
    assert.equal(out.layout, `oci:${dir}:latest`);
    assert.equal(out.digest, f.image.manifest.digest);
    assert.ok(existsSync(join(dir, "blobs", "sha256", LAYER1.digest.slice(7))));
  });

  test(`fetch --raw-blobs ${server.protocol === "0.2.8" ? "fetches with GetRawBlob" : "fails clearly before protocol 0.2.8"} (${server.name})`, () => {
    const dir = join(tempDir("cli-raw"), "layout");
    const result = cli("fetch", REF, "--raw-blobs", "-o", dir);
    if (server.protocol === "0.2.8") {
      assertOk(result);
      assert.equal((result.json() as { digest: string }).digest, f.image.manifest.digest);
    } else {
      assertFailed(result, /--raw-blobs needs GetRawBlob.*0\.2\.8.*speaks 0\.2\.3/);
      assert.ok(!existsSync(dir), "nothing written");
    }
  });

  test(`extract unpacks the image's filesystem (${server.name})`, () => {
    const dir = join(tempDir("cli-extract"), "rootfs");
    const result = cli("extract", REF, dir);
    assertOk(result);
    const out = result.json() as { files: number; layers: { compression: string }[] };
    assert.equal(out.files, 5);
    assert.deepEqual(out.layers.map((l) => l.compression), ["gzip", "gzip"]);
    assert.equal(readFileSync(join(dir, "bin/hello"), "utf8"), "#!/bin/sh\necho hello\n");
    assert.equal(readlinkSync(join(dir, "bin/sh")), "hello");
    assert.deepEqual(new Uint8Array(readFileSync(join(dir, "usr/share/data.bin"))), noise(300_000, 7));
  });

  test(`extract of an uncompressed docker-archive works (${server.name})`, () => {
    const dir = join(tempDir("cli-extract"), "rootfs");
    const result = cli("extract", `docker-archive:${f.dockerArchive}`, dir);
    assertOk(result);
    assert.deepEqual(
      (result.json() as { layers: { compression: string }[] }).layers.map((l) => l.compression),
      [
        "none",
        "none",
      ],
    );
    assert.equal(readFileSync(join(dir, "etc/motd"), "utf8"), "welcome\n");
  });

  test(`a missing image fails with one error line and exit status 1 (${server.name})`, () => {
    for (
      const command of [["metadata"], ["config"], ["layers"], ["fetch"], ["extract", "/nonexistent-target"]]
    ) {
      const [name, ...rest] = command;
      const result = cli(name, `oci:${f.layout}:no-such-tag`, ...rest);
      assertFailed(result, /no-such-tag/);
      assert.equal(result.stdout.length, 0, name);
    }
  });
}

test("an unknown command is bad usage with exit status 2 and a usage hint", () => {
  const result = runCli(["frobnicate", REF]);
  assertFailed(result, /unknown command "frobnicate"/, 2);
  assert.match(result.stderr, /^usage: image-proxy \[OPTIONS\] COMMAND/m);
});

test("an unknown flag is bad usage with exit status 2", () => {
  const result = runCli(["metadata", "--frob", REF]);
  assertFailed(result, /unknown option --frob/, 2);
  assert.match(result.stderr, /^usage: image-proxy \[OPTIONS\] metadata REF/m);
});

test("a missing operand and a malformed reference are bad usage", () => {
  assertFailed(runCli(["extract", REF]), /missing DIR/, 2);
  assertFailed(runCli(["metadata", "nonsense"]), /Invalid image reference "nonsense"/, 2);
  assertFailed(runCli([]), /no command given/, 2);
});

test("--help lists every command and COMMAND --help shows its usage", () => {
  const result = runCli(["--help"]);
  assertOk(result);
  for (const command of ["metadata", "config", "layers", "blob", "blob-raw", "fetch", "extract"]) {
    assert.match(result.text, new RegExp(`^  ${command} `, "m"));
    const sub = runCli([command, "--help"]);
    assertOk(sub);
    assert.match(sub.text, new RegExp(`^Usage: image-proxy \\[OPTIONS\\] ${command} `));
  }
});

test("a skopeo that cannot be started fails with one error line naming the fix", () => {
  const result = runCli(["--skopeo", "/nonexistent/bin/skopeo", "metadata", REF]);
  assertFailed(result, /skopeo/);
});

test("global options map to the proxy configuration", () => {
  const parsed = parseArgs([
    "--authfile=/a.json",
    "--cert-dir",
    "/certs",
    "--tls-verify=false",
    "--registries-conf",
    "/r.conf",
    "--registries.d",
    "/r.d",
    "--override-arch",
    "arm64",
    "--override-os=linux",
    "--override-variant",
    "v8",
    "--skopeo",
    "  setpriv --pdeathsig SIGTERM --  /opt/skopeo ",
    "--debug",
    "fetch",
    "--policy",
    "/p.json",
    "-q",
    REF,
    "--raw-blobs",
    "--output",
    "/out",
  ]);
  assert.deepEqual(parsed.config, {
    authfile: "/a.json",
    certificateDirectory: "/certs",
    insecureSkipTlsVerification: true,
    registriesConf: "/r.conf",
    registriesD: "/r.d",
    overrideArch: "arm64",
    overrideOs: "linux",
    overrideVariant: "v8",
    skopeoCmd: ["setpriv", "--pdeathsig", "SIGTERM", "--", "/opt/skopeo"],
    debug: true,
    policy: "/p.json",
  });
  assert.equal(parsed.command, "fetch");
  assert.deepEqual(parsed.operands, [REF]);
  assert.equal(parsed.output, "/out");
  assert.equal(parsed.rawBlobs, true);
  assert.equal(parsed.quiet, true);
  assert.deepEqual(parseArgs(["--no-creds", "--insecure-policy", "layers", REF]).config, {
    authAnonymous: true,
    insecurePolicy: true,
  });
  assert.throws(() => parseArgs(["--tls-verify=maybe", "layers", REF]), UsageError);
  assert.throws(() => parseArgs(["metadata", REF, "--output", "/x"]), /unknown option --output/);
  assert.throws(() => parseArgs(["--policy", "/p", "--insecure-policy", "layers", REF]), /conflict/);
});

test("the progress line redraws at most ten times a second, in place, and is cleared", () => {
  let clock = 0;
  const writes: string[] = [];
  const line = new ProgressLine({ write: (t) => writes.push(t), columns: () => 40, now: () => clock }, true);
  for (let i = 0; i <= 1000; i++) {
    clock = i * 2; // 2 seconds of updates every 2 ms
    line.update({
      action: "fetching",
      layer: 1 + (i >> 9),
      layers: 2,
      bytes: i * 1000,
      totalBytes: 2_000_000,
    });
  }
  assert.ok(writes.length <= 21, `${writes.length} redraws in 2 s`);
  assert.ok(writes.length >= 10);
  for (const text of writes) {
    // Overwrite, then erase the rest: no blank frame in between, no newline.
    assert.ok(text.startsWith("\r") && text.endsWith("\x1b[K"), JSON.stringify(text));
    assert.ok(!/[\r\n]/.test(text.slice(1, -3)), JSON.stringify(text));
    assert.ok(text.length - 4 <= 39, "never wider than the terminal");
  }
  assert.match(writes.at(-1)!, /layer 2 of 2/);
  line.clear();
  assert.equal(writes.at(-1), "\r\x1b[K");
  const quiet: string[] = [];
  const off = new ProgressLine({ write: (t) => quiet.push(t), columns: () => 80, now: () => 0 }, false);
  off.update({ action: "fetching", bytes: 1 });
  off.clear();
  assert.deepEqual(quiet, []);
  assert.equal(formatBytes(1536), "1.5 KiB");
});

test("run shows progress on a terminal stderr, clears it, and keeps stdout pure JSON", async () => {
  const server = SERVERS[0];
  assert.ok(server, "a skopeo server is needed");
  const stdout: string[] = [];
  const stderr: string[] = [];
  let clock = 0;
  const io: CliIo = {
    args: ["--skopeo", server.skopeoCmd.join(" "), "fetch", REF],
    writeStdout: (data) => {
      stdout.push(typeof data === "string" ? data : new TextDecoder().decode(data));
      return Promise.resolve();
    },
    writeStderr: (text) => void stderr.push(text),
    stderrIsTerminal: true,
    columns: () => 80,
    now: () => (clock += 5),
    onInterrupt: () => () => {},
  };
  assert.equal(await run(io), 0);
  const out = JSON.parse(stdout.join(""));
  assert.equal(out.digest, f.image.manifest.digest);
  const drawn = stderr.join("");
  assert.match(drawn, /fetching {2}layer \d of 2/);
  assert.ok(drawn.endsWith("\r\x1b[K"), "cleared before exit");
  assert.ok(!stdout.join("").includes("\r"), "never on stdout");
  stderr.length = 0;
  assert.equal(await run({ ...io, args: ["-q", ...io.args] }), 0);
  assert.deepEqual(stderr, [], "--quiet draws nothing");
});

test("on a real terminal the progress goes to stderr while stdout carries the exact blob", () => {
  const server = SERVERS[0];
  assert.ok(server, "a skopeo server is needed");
  const dir = tempDir("pty");
  const out = join(dir, "blob.bin");
  const transcript = join(dir, "terminal.txt");
  const quote = (arg: string) => `'${arg.replaceAll("'", `'\\''`)}'`;
  const command = [
    ...cliCommand(),
    "--skopeo",
    server.skopeoCmd.join(" "),
    "blob",
    REF,
    LAYER1.digest,
    String(LAYER1.size),
  ].map(quote).join(" ");
  // util-linux script(1) runs the command on a pseudo-terminal: stderr is a terminal, stdout a file.
  const result = spawnSync("script", ["-qefc", `${command} > ${quote(out)}`, transcript], {
    encoding: "utf8",
    timeout: 60_000,
    env: { ...process.env, COLUMNS: "100" },
  });
  assert.equal(result.status, 0, `${result.stderr}\n${readFileSync(transcript, "utf8")}`);
  assert.deepEqual(new Uint8Array(readFileSync(out)), LAYER1.data, "stdout is the blob, byte for byte");
  const terminal = readFileSync(transcript, "utf8");
  assert.ok(terminal.includes("\r\x1b[K"), "the progress line was drawn in place and cleared");
});
