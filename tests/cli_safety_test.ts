// The command line in front of hostile or silent peers: every line it writes to stderr shows control
// characters as visible escapes (a layer name or a server message cannot retitle or clear the
// terminal), and a registry that accepts connections and never answers ends in an error, not a hang.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createServer, type Socket } from "node:net";
import { ImageProxyError } from "../mod.ts";
import { SERVERS } from "./helpers/env.ts";
import { cliCommand, type CliResult, runCli, tempDir } from "./helpers/cli-helpers.ts";
import { type CliIo, run } from "../src/cli/main.ts";
import { CLI_REQUEST_TIMEOUT_SECONDS, mainHelp, parseArgs, UsageError } from "../src/cli/args.ts";
import { escapeControls } from "../src/cli/io.ts";
import { printJson } from "../src/cli/commands.ts";
import { ProgressLine } from "../src/cli/progress.ts";
import type { ImageProxyConfig } from "../src/config.ts";

/** A title change, a bell, a screen clear, a C1 CSI and a DEL, as a hostile name would carry them. */
const HOSTILE = "\x1b]0;owned\x07\x1b[2J\x9b31m\x7f";
/** The same, as the command line must show it. */
const SHOWN = "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x7f";

/** The control characters in `text` (C0, DEL, C1), except one final newline. */
function controls(text: string): string[] {
  return [...text.replace(/\n$/, "")].filter((c) => {
    const code = c.charCodeAt(0);
    return code < 0x20 || (code >= 0x7f && code <= 0x9f);
  });
}

/** A CliIo that records what is written, for `run` in this process. */
function recordingIo(args: string[], stderrIsTerminal = false) {
  const stdout: string[] = [];
  const stderr: string[] = [];
  const io: CliIo = {
    args,
    writeStdout: (data) => {
      stdout.push(typeof data === "string" ? data : new TextDecoder().decode(data));
      return Promise.resolve();
    },
    writeStderr: (text) => void stderr.push(text),
    stderrIsTerminal,
    columns: () => 200,
    now: () => 0,
    onInterrupt: () => () => {},
  };
  return { io, stdout, stderr };
}

function assertOneSafeErrorLine(stderr: string): void {
  assert.equal(stderr.split("\n").length, 2, `one line: ${JSON.stringify(stderr)}`);
  assert.match(stderr, /^error: /);
  assert.deepEqual(controls(stderr), [], `no raw control character: ${JSON.stringify(stderr)}`);
}

test("escapeControls shows C0, DEL and C1 characters as visible escapes and leaves the rest alone", () => {
  assert.equal(escapeControls(`a${HOSTILE}b`), `a${SHOWN}b`);
  assert.equal(escapeControls("line\nfeed\rtab\there\0"), "line\\nfeed\\rtab\\there\\x00");
  assert.equal(escapeControls("\x85\x9f\x80"), "\\x85\\x9f\\x80");
  const plain = 'Cannot open "oci:/srv/ünïcødé:1" — 100 % (ok) ~ \u00a0\u2028';
  assert.equal(escapeControls(plain), plain, "printable text, Unicode included, is untouched");
});

test("an error message with control characters reaches stderr as one escaped line", async () => {
  const { io, stderr } = recordingIo(["metadata", "oci:/srv/layout:latest"]);
  const status = await run(io, {
    spawn: () => Promise.reject(new ImageProxyError(`Entry "etc/${HOSTILE}" is hostile\nsecond line`)),
  });
  assert.equal(status, 1);
  const text = stderr.join("");
  assertOneSafeErrorLine(text);
  assert.ok(text.includes(`etc/${SHOWN}`), text);
  assert.ok(text.includes("is hostile; second line"), "a multi-line message is still folded");
});

test("a usage error naming a hostile word is escaped too, with its usage hint", async () => {
  const { io, stderr } = recordingIo([`x${HOSTILE}`]);
  assert.equal(await run(io), 2);
  const text = stderr.join("");
  assert.equal(text.split("\n").length, 3, JSON.stringify(text));
  assert.deepEqual(controls(text.replace(/\n/g, " ")), [], JSON.stringify(text));
  assert.ok(text.includes(`unknown command "x${SHOWN}"`), text);
});

test("the --debug stack trace is escaped line by line", async () => {
  const { io, stderr } = recordingIo(["--debug", "metadata", "oci:/srv/layout:latest"]);
  await run(io, { spawn: () => Promise.reject(new ImageProxyError(`bad ${HOSTILE}`)) });
  for (const line of stderr.join("").split("\n")) assert.deepEqual(controls(line), [], line);
});

test("the progress line escapes its text, keeping only its own carriage return and erase", () => {
  const writes: string[] = [];
  const line = new ProgressLine({ write: (t) => writes.push(t), columns: () => 200, now: () => 0 }, true);
  line.update({ action: `fetching ${HOSTILE}`, bytes: 10 });
  assert.equal(writes.length, 1);
  assert.ok(writes[0].startsWith("\r") && writes[0].endsWith("\x1b[K"), JSON.stringify(writes[0]));
  const inner = writes[0].slice(1, -3);
  assert.deepEqual(controls(inner), [], JSON.stringify(inner));
  assert.ok(inner.includes(SHOWN), inner);
});

test("JSON on stdout escapes DEL and C1 characters and still parses to the same value", async () => {
  const { io, stdout } = recordingIo([]);
  const value = { mediaType: `text${HOSTILE}`, layers: ["\x85"] };
  await printJson(io, value);
  const text = stdout.join("");
  assert.deepEqual(controls(text.replace(/\n/g, "")), [], JSON.stringify(text));
  assert.deepEqual(JSON.parse(text), value);
});

for (const server of SERVERS) {
  test(`a server message quoting a hostile path is escaped on stderr (${server.name})`, () => {
    const result = runCli([
      "--skopeo",
      server.skopeoCmd.join(" "),
      "metadata",
      `oci:/nonexistent/${HOSTILE}:latest`,
    ]);
    assert.equal(result.status, 1, result.stderr);
    assertOneSafeErrorLine(result.stderr);
    assert.ok(result.stderr.includes(SHOWN), result.stderr);
  });
}

test("--request-timeout and --blob-idle-timeout take seconds and set the proxy's timeouts", () => {
  const parsed = parseArgs(["--request-timeout", "2.5", "--blob-idle-timeout=0", "metadata", "oci:/x:1"]);
  assert.equal(parsed.config.requestTimeoutMs, 2500);
  assert.equal(parsed.config.blobIdleTimeoutMs, 0);
  assert.equal(parseArgs(["metadata", "oci:/x:1", "--request-timeout=0"]).config.requestTimeoutMs, 0);
  for (const bad of ["-1", "abc", "1e3", "0x10", " 5", "2147484", "Infinity", "5s"]) {
    assert.throws(
      () => parseArgs(["--request-timeout", bad, "metadata", "oci:/x:1"]),
      (err: unknown) =>
        err instanceof UsageError && /--request-timeout takes a number of seconds/.test(err.message),
      bad,
    );
    assert.throws(() => parseArgs([`--blob-idle-timeout=${bad}`, "metadata", "oci:/x:1"]), UsageError, bad);
  }
  assert.throws(() => parseArgs(["--request-timeout=", "metadata", "oci:/x:1"]), UsageError);
  const help = mainHelp();
  assert.match(help, /--request-timeout SECS .*\n.*\(default 300; 0 waits for ever\)/);
  assert.match(help, /--blob-idle-timeout SECS .*\n.*\(default 120; 0 waits for ever\)/);
});

test("the command line gives requests a timeout unless told otherwise", async () => {
  const seen: ImageProxyConfig[] = [];
  const capture = (config: ImageProxyConfig) => {
    seen.push(config);
    return Promise.reject(new ImageProxyError("stop here"));
  };
  await run(recordingIo(["metadata", "oci:/x:1"]).io, { spawn: capture });
  await run(recordingIo(["--request-timeout", "7", "metadata", "oci:/x:1"]).io, { spawn: capture });
  await run(recordingIo(["--request-timeout", "0", "metadata", "oci:/x:1"]).io, { spawn: capture });
  assert.deepEqual(seen.map((c) => c.requestTimeoutMs), [CLI_REQUEST_TIMEOUT_SECONDS * 1000, 7000, 0]);
  assert.equal(CLI_REQUEST_TIMEOUT_SECONDS, 300);
});

/** Runs the CLI as a child process without blocking this one (the test's listener must keep running). */
function runCliAsync(args: string[], timeoutMs: number): Promise<CliResult & { ms: number }> {
  const [command, ...prefix] = cliCommand();
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(command, [...prefix, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    const out: Uint8Array[] = [];
    let stderr = "";
    child.stdout!.on("data", (chunk: Uint8Array) => out.push(chunk));
    child.stderr!.on("data", (chunk: Uint8Array) => stderr += new TextDecoder().decode(chunk));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`The command line hung for ${timeoutMs} ms; stderr: ${stderr}`));
    }, timeoutMs);
    child.on("error", reject);
    child.on("close", (status: number | null) => {
      clearTimeout(timer);
      const stdout = new Uint8Array(Buffer.concat(out));
      const text = new TextDecoder().decode(stdout);
      resolve({ status, stdout, stderr, text, json: () => JSON.parse(text), ms: Date.now() - started });
    });
  });
}

/** The pids of processes whose command line contains `marker`. */
function processesWith(marker: string): string[] {
  try {
    return execFileSync("pgrep", ["-f", marker], { encoding: "utf8" }).split("\n").filter((l) => l);
  } catch {
    return []; // pgrep exits 1 when nothing matches
  }
}

for (const server of SERVERS) {
  test(`metadata against a registry that never answers fails after --request-timeout, leaving no skopeo (${server.name})`, async () => {
    const connections: Socket[] = [];
    const listener = createServer((socket) => void connections.push(socket)); // accepts, never answers
    await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve));
    const port = (listener.address() as { port: number }).port;
    // An empty registries.d of its own marks this run's skopeo on its command line. No setpriv: the
    // command line itself must stop skopeo, since nothing else would.
    const marker = tempDir("silent-registry");
    try {
      const result = await runCliAsync([
        "--skopeo",
        server.binary.join(" "),
        "--registries.d",
        marker,
        "--tls-verify=false",
        "--request-timeout",
        "1.5",
        "metadata",
        `docker://127.0.0.1:${port}/x`,
      ], 60_000);
      assert.equal(result.status, 1, result.stderr);
      assertOneSafeErrorLine(result.stderr);
      assert.match(result.stderr, /^error: OpenImage got no answer within 1500 ms/);
      assert.equal(result.stdout.length, 0);
      assert.ok(connections.length > 0, "skopeo did reach the silent registry");
      assert.deepEqual(processesWith(marker), [], "no skopeo is left behind");
    } finally {
      for (const socket of connections) socket.destroy();
      await new Promise((resolve) => listener.close(resolve));
    }
  });
}
