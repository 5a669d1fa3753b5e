/**
 * The `image-proxy` command line grammar: global options (the {@linkcode ImageProxyConfig} ones plus
 * `--quiet` and `--help`), one command, its operands and its options. Pure: no I/O.
 *
 * @module
 */

import { DEFAULT_BLOB_IDLE_TIMEOUT_MS, type ImageProxyConfig } from "../config.ts";
import { digestProblem, ImageReference } from "../reference.ts";
import { InvalidReferenceError } from "../errors.ts";
import { parsePlatform, platformConfig, type PlatformName } from "../image/platforms.ts";

/** The program's name, as help and usage lines show it. */
export const PROGRAM = "image-proxy";

/** Bad usage: exit status 2 with a usage hint. */
export class UsageError extends Error {
  /** The command whose usage to show, when one was recognised. */
  readonly command: string | undefined;
  /** Creates the error; `command` picks the usage line shown with it. */
  constructor(message: string, command?: string) {
    super(message);
    this.name = "UsageError";
    this.command = command;
  }
}

/** One command's grammar and help. */
export interface CommandSpec {
  /** Operand names, in order. */
  operands: string[];
  /** Operands that may follow the required ones. */
  optional?: string[];
  /** The usage line after `image-proxy [OPTIONS]`. */
  usage: string;
  /** One line for the command list. */
  summary: string;
  /** The rest of its help. */
  help: string;
}

/** Every command, in the order the help lists them. */
export const COMMANDS: Record<string, CommandSpec> = {
  metadata: {
    operands: ["REF"],
    usage: "metadata REF",
    summary: "print the manifest digest and the OCI manifest as JSON",
    help: 'Prints {"digest": ..., "manifest": {...}}: the manifest as OCI (converted by skopeo when the\n' +
      "source has another format) and the digest of the manifest as the source stores it. For a multi-arch\n" +
      "image both describe the instance for this platform (or the --override-* one).",
  },
  config: {
    operands: ["REF"],
    usage: "config REF",
    summary: "print the OCI image configuration as JSON",
    help: "Prints the full OCI image configuration (architecture, os, config, rootfs, history).",
  },
  layers: {
    operands: ["REF"],
    usage: "layers REF",
    summary: "print the layers (digest, size, media type) as JSON",
    help: 'Prints [{"digest", "size", "media_type"}] for every layer. Proxies older than protocol 0.2.5\n' +
      "have no GetLayerInfo: the list then comes from the manifest.",
  },
  blob: {
    operands: ["REF", "DIGEST", "SIZE"],
    usage: "blob REF DIGEST SIZE",
    summary: "write a blob to standard output, verified by skopeo",
    help: "Writes the blob DIGEST of SIZE bytes to standard output. The exit status is 0 only when skopeo\n" +
      "confirmed size and digest once every byte was written; redirect to a temporary file and keep it\n" +
      "only on success.",
  },
  "blob-raw": {
    operands: ["REF", "DIGEST"],
    usage: "blob-raw REF DIGEST",
    summary: "write a blob fetched with GetRawBlob to standard output, verified here",
    help:
      "Writes the blob DIGEST to standard output, fetched with GetRawBlob (protocol 0.2.8, skopeo 1.19\n" +
      "or newer), which skopeo does not hash: this program verifies size and digest instead. As for\n" +
      "`blob`, the exit status tells whether the bytes written were verified.",
  },
  fetch: {
    operands: ["REF"],
    usage: "fetch REF [--raw-blobs] [--output DIR]",
    summary: "fetch every layer; with --output, write an OCI image layout",
    help: "Fetches the configuration and every layer, verified, and prints a JSON summary.\n\n" +
      "Options:\n" +
      '  -o, --output DIR  write an OCI image layout to DIR (oci:DIR:TAG, TAG from REF or "latest");\n' +
      "                    blobs already in DIR with the right digest are not fetched again\n" +
      "  --raw-blobs       fetch with GetRawBlob (protocol 0.2.8), verified by this program",
  },
  extract: {
    operands: ["REF", "DIR"],
    usage: "extract REF DIR [--overwrite] [--no-same-owner] [--no-xattrs]",
    summary: "unpack the image's filesystem into DIR",
    help: "Applies every layer in order into DIR (created if missing), with OCI whiteouts. Entries that\n" +
      'would escape DIR (absolute names, "..", symlinks or hardlinks leading outside) are refused.\n' +
      "Run as root, files keep the layers' numeric owners; device nodes and FIFOs are skipped and\n" +
      "counted in the JSON summary.\n\n" +
      "Options:\n" +
      "  --overwrite      extract into a DIR that already holds files (refused otherwise); whiteouts\n" +
      "                   then remove only what earlier layers of the image wrote\n" +
      "  --no-same-owner  files belong to the user running this, setuid and setgid bits dropped\n" +
      "                   (the default when not running as root)\n" +
      "  --no-xattrs      write no extended attributes (by default user.* and security.capability,\n" +
      "                   and as root trusted.* and security.* too)",
  },
  ls: {
    operands: ["REF"],
    optional: ["PATH"],
    usage: "ls REF [PATH] [--json]",
    summary: "list the image's final file system (whiteouts applied), like tar -tv",
    help:
      "Lists every path of the image's final file system, as a container sees it, without unpacking it:\n" +
      "each layer is read once and checked against its diff id. With PATH, only PATH and what lies below.\n" +
      "Times are UTC; owners are numeric.\n\n" +
      "Options:\n" +
      "  --json  one JSON object per line: path, type (file, dir, symlink, hardlink, char, block, fifo),\n" +
      "          mode, uid, gid, size, mtime, linkname, layer (index from 0, bottom first), layerDigest",
  },
  cat: {
    operands: ["REF", "PATH"],
    usage: "cat REF PATH",
    summary: "write one file of the image to standard output",
    help: "Writes the file at PATH to standard output. Layers are read from the top, and only down to the\n" +
      "first one that holds PATH or hides it. Symlinks are followed inside the image root. A missing\n" +
      "path or a directory is an error (exit status 1).",
  },
  export: {
    operands: ["REF"],
    usage: "export REF [-o FILE]",
    summary: "write the flattened file system as one tar (like crane export)",
    help:
      "Writes one tar holding the image's final file system: each path once, from the layer that wins,\n" +
      "no whiteout files, hardlinks kept when their target survives. Each layer is read once, from the\n" +
      "top; upper layers come first in the archive, directories last. The exit status is 0 only when\n" +
      "every layer matched its diff id.\n\n" +
      "Options:\n" +
      "  -o, --output FILE  write to FILE instead of standard output (removed again on failure)",
  },
  platforms: {
    operands: ["REF"],
    usage: "platforms REF",
    summary: "list the platforms of a multi-arch image with their digests",
    help: "Lists the platforms REF is available for, with the digest of each one's manifest. The proxy\n" +
      "cannot return a manifest list, so this runs `skopeo inspect --raw REF` with the same options.\n" +
      "Use --platform OS/ARCH[/VARIANT] with any other command to pick one.",
  },
};

/** What the command line asks for. */
export interface ParsedArgs {
  /** The proxy configuration from the global options. */
  config: ImageProxyConfig;
  /** `--quiet`: no progress display. */
  quiet: boolean;
  /** `--help` (for the command, when one was given). */
  help: boolean;
  /** The command, or `undefined` when none was given. */
  command: string | undefined;
  /** The command's operands, validated. */
  operands: string[];
  /** `fetch --output DIR`, `export --output FILE`. */
  output: string | undefined;
  /** `fetch --raw-blobs`. */
  rawBlobs: boolean;
  /** `extract --overwrite`: extract into a directory that already holds files. */
  overwrite: boolean;
  /** `extract --no-same-owner`: files belong to the user running it, setuid and setgid dropped. */
  noSameOwner: boolean;
  /** `extract --no-xattrs`: no extended attribute is written. */
  noXattrs: boolean;
  /** `ls --json`. */
  json: boolean;
  /** `--platform OS/ARCH[/VARIANT]`, as given (its overrides are in `config`). */
  platform: string | undefined;
  /** `--cache DIR`: the blob cache's directory. */
  cache: string | undefined;
  /** `--cache-size SIZE`: the blob cache's limit in bytes. */
  cacheSize: number | undefined;
}

type ValueOption = (config: ImageProxyConfig, value: string) => void;

/**
 * The command line's `requestTimeoutMs` when `--request-timeout` is not given, in seconds. The library
 * waits for ever by default, since it cannot know what its caller does; a person at a terminal is
 * better served by an error than by a command that hangs on a registry that accepts connections and
 * never answers. Five minutes is far above any sound request: skopeo's own network steps give up after
 * 30 s (connect) and 10 s (TLS handshake), and a blob's bytes are not timed by it, only the server's
 * verdict once they are all read (`--blob-idle-timeout` covers a blob that stalls). The exception: a
 * blob whose size skopeo does not know is waited for as a whole, so one that takes longer needs a
 * larger value or 0.
 */
export const CLI_REQUEST_TIMEOUT_SECONDS = 300;

/** The longest timeout a timer can hold (2^31 - 1 ms, about 24.8 days); a longer one fires at once. */
const MAX_TIMEOUT_SECONDS = Math.floor((2 ** 31 - 1) / 1000);

/** An option taking a number of seconds (fractions allowed, 0 for off), stored in milliseconds. */
function secondsOption(option: string, field: "requestTimeoutMs" | "blobIdleTimeoutMs"): ValueOption {
  return (config, value) => {
    const seconds = /^[0-9]+(\.[0-9]+)?$/.test(value) ? Number(value) : NaN;
    if (!(seconds <= MAX_TIMEOUT_SECONDS)) {
      throw new UsageError(
        `option ${option} takes a number of seconds from 0 (off) to ${MAX_TIMEOUT_SECONDS}, not "${value}"`,
      );
    }
    config[field] = Math.round(seconds * 1000);
  };
}

const VALUE_OPTIONS: Record<string, ValueOption> = {
  "--authfile": (c, v) => c.authfile = v,
  "--cert-dir": (c, v) => c.certificateDirectory = v,
  "--policy": (c, v) => c.policy = v,
  "--registries-conf": (c, v) => c.registriesConf = v,
  "--registries.d": (c, v) => c.registriesD = v,
  "--override-arch": (c, v) => c.overrideArch = v,
  "--override-os": (c, v) => c.overrideOs = v,
  "--override-variant": (c, v) => c.overrideVariant = v,
  "--request-timeout": secondsOption("--request-timeout", "requestTimeoutMs"),
  "--blob-idle-timeout": secondsOption("--blob-idle-timeout", "blobIdleTimeoutMs"),
  "--skopeo": (c, v) => {
    const words = v.trim().split(/\s+/).filter((w) => w !== "");
    if (words.length === 0) throw new UsageError("option --skopeo needs a command");
    c.skopeoCmd = words;
  },
};

const FLAG_OPTIONS: Record<string, (args: ParsedArgs) => void> = {
  "--no-creds": (a) => a.config.authAnonymous = true,
  "--insecure-policy": (a) => a.config.insecurePolicy = true,
  "--debug": (a) => a.config.debug = true,
  "--quiet": (a) => a.quiet = true,
  "-q": (a) => a.quiet = true,
  "--help": (a) => a.help = true,
  "-h": (a) => a.help = true,
};

const SIZE_UNITS: Record<string, number> = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** A size in bytes with an optional binary suffix (`512M`, `10G`). */
function parseByteSize(option: string, value: string, command: string | undefined): number {
  const match = /^([0-9]+)([KMGT]?)$/i.exec(value);
  const bytes = match ? Number(match[1]) * SIZE_UNITS[match[2].toUpperCase()] : NaN;
  if (!Number.isSafeInteger(bytes)) {
    throw new UsageError(
      `option ${option} takes a number of bytes with an optional K, M, G or T suffix, not "${value}"`,
      command,
    );
  }
  return bytes;
}

function parseBoolean(option: string, value: string): boolean {
  if (value === "true") return true;
  if (value === "false") return false;
  throw new UsageError(`option ${option} takes "true" or "false", not "${value}"`);
}

/**
 * Parses the arguments after the program name. Global options may come before or after the command;
 * `--` ends option parsing.
 *
 * @throws {UsageError} for anything malformed: unknown options or commands, missing or extra operands,
 * an invalid reference, digest or size.
 */
export function parseArgs(argv: readonly string[]): ParsedArgs {
  const parsed: ParsedArgs = {
    config: {},
    quiet: false,
    help: false,
    command: undefined,
    operands: [],
    output: undefined,
    rawBlobs: false,
    overwrite: false,
    noSameOwner: false,
    noXattrs: false,
    json: false,
    platform: undefined,
    cache: undefined,
    cacheSize: undefined,
  };
  const words: string[] = [];
  let optionsEnded = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (optionsEnded || !arg.startsWith("-") || arg === "-") {
      if (parsed.command === undefined && words.length === 0) {
        if (!(arg in COMMANDS)) {
          throw new UsageError(`unknown command "${arg}" (commands: ${Object.keys(COMMANDS).join(", ")})`);
        }
        parsed.command = arg;
      } else {
        words.push(arg);
      }
      continue;
    }
    if (arg === "--") {
      optionsEnded = true;
      continue;
    }
    const equals = arg.indexOf("=");
    const name = equals > 0 && arg.startsWith("--") ? arg.slice(0, equals) : arg;
    const inline = equals > 0 && arg.startsWith("--") ? arg.slice(equals + 1) : undefined;
    const takeValue = (): string => {
      if (inline !== undefined) return inline;
      const value = argv[i + 1];
      if (value === undefined) throw new UsageError(`option ${name} needs a value`, parsed.command);
      i++;
      return value;
    };
    if (name === "--tls-verify") {
      parsed.config.insecureSkipTlsVerification = inline === undefined ? false : !parseBoolean(name, inline);
      continue;
    }
    if (name === "--platform" || name === "--cache") {
      const value = takeValue();
      if (value === "") throw new UsageError(`option ${name} needs a non-empty value`, parsed.command);
      if (name === "--platform") parsed.platform = value;
      else parsed.cache = value;
      continue;
    }
    if (name === "--cache-size") {
      parsed.cacheSize = parseByteSize(name, takeValue(), parsed.command);
      continue;
    }
    const valueOption = VALUE_OPTIONS[name];
    if (valueOption) {
      const value = takeValue();
      if (value === "") throw new UsageError(`option ${name} needs a non-empty value`, parsed.command);
      valueOption(parsed.config, value);
      continue;
    }
    const flag = FLAG_OPTIONS[name];
    if (flag) {
      if (inline !== undefined) throw new UsageError(`option ${name} takes no value`, parsed.command);
      flag(parsed);
      continue;
    }
    if (
      (parsed.command === "fetch" || parsed.command === "export") && (name === "--output" || name === "-o")
    ) {
      const value = takeValue();
      if (value === "") throw new UsageError(`option ${name} needs a non-empty value`, parsed.command);
      parsed.output = value;
      continue;
    }
    if (parsed.command === "fetch" && name === "--raw-blobs") {
      if (inline !== undefined) throw new UsageError(`option ${name} takes no value`, "fetch");
      parsed.rawBlobs = true;
      continue;
    }
    if (
      parsed.command === "extract" &&
      (name === "--overwrite" || name === "--no-same-owner" || name === "--no-xattrs")
    ) {
      if (inline !== undefined) throw new UsageError(`option ${name} takes no value`, "extract");
      if (name === "--overwrite") parsed.overwrite = true;
      else if (name === "--no-xattrs") parsed.noXattrs = true;
      else parsed.noSameOwner = true;
      continue;
    }
    if (parsed.command === "ls" && name === "--json") {
      if (inline !== undefined) throw new UsageError(`option ${name} takes no value`, "ls");
      parsed.json = true;
      continue;
    }
    throw new UsageError(`unknown option ${name}`, parsed.command);
  }
  if (parsed.config.policy !== undefined && parsed.config.insecurePolicy) {
    throw new UsageError("options --policy and --insecure-policy conflict", parsed.command);
  }
  if (parsed.platform !== undefined) {
    const { overrideOs, overrideArch, overrideVariant } = parsed.config;
    if (overrideOs !== undefined || overrideArch !== undefined || overrideVariant !== undefined) {
      throw new UsageError("option --platform conflicts with the --override-* options", parsed.command);
    }
    let platform: PlatformName;
    try {
      platform = parsePlatform(parsed.platform);
    } catch (err) {
      throw new UsageError((err as Error).message, parsed.command);
    }
    parsed.config = platformConfig(parsed.config, platform);
  }
  if (parsed.cacheSize !== undefined && parsed.cache === undefined) {
    throw new UsageError("option --cache-size needs --cache DIR", parsed.command);
  }
  if (parsed.config.authfile !== undefined && parsed.config.authAnonymous) {
    throw new UsageError("options --authfile and --no-creds conflict", parsed.command);
  }
  if (parsed.help) return parsed;
  if (parsed.command === undefined) {
    throw new UsageError(words.length ? `unknown command "${words[0]}"` : "no command given");
  }
  const spec = COMMANDS[parsed.command];
  if (words.length < spec.operands.length) {
    throw new UsageError(`missing ${spec.operands.slice(words.length).join(" ")}`, parsed.command);
  }
  const operands = [...spec.operands, ...(spec.optional ?? [])];
  if (words.length > operands.length) {
    throw new UsageError(`unexpected argument "${words[operands.length]}"`, parsed.command);
  }
  for (const [i, value] of words.entries()) {
    const operand = operands[i];
    if (operand === "REF") {
      try {
        ImageReference.parse(value);
      } catch (err) {
        if (err instanceof InvalidReferenceError) throw new UsageError(err.message, parsed.command);
        throw err;
      }
    } else if (operand === "DIGEST") {
      const problem = digestProblem(value);
      if (problem) throw new UsageError(`invalid digest: ${problem}`, parsed.command);
    } else if (operand === "SIZE") {
      if (!/^[0-9]+$/.test(value) || !Number.isSafeInteger(Number(value))) {
        throw new UsageError(`invalid size "${value}": expected a number of bytes`, parsed.command);
      }
    } else if (value === "") {
      throw new UsageError(`${operand} must not be empty`, parsed.command);
    }
  }
  parsed.operands = words;
  return parsed;
}

const GLOBAL_HELP = `Options (before or after the command):
  --authfile PATH           auth.json to use
  --no-creds                access the registry anonymously
  --cert-dir DIR            certificates for registry TLS (*.crt, *.cert, *.key)
  --tls-verify=false        do not verify registry TLS certificates
  --policy PATH             signature policy file (enforced by skopeo 1.13 or newer)
  --insecure-policy         accept any image regardless of policy
  --registries-conf PATH    registries.conf to use
  --registries.d DIR        registries.d directory (signature lookaside)
  --override-arch ARCH      pick ARCH from multi-arch images
  --override-os OS          pick OS from multi-arch images
  --override-variant VAR    pick VARIANT from multi-arch images
  --request-timeout SECS    fail when skopeo does not answer a request within SECS seconds
                            (default ${CLI_REQUEST_TIMEOUT_SECONDS}; 0 waits for ever)
  --blob-idle-timeout SECS  fail a blob that receives no data for SECS seconds
                            (default ${DEFAULT_BLOB_IDLE_TIMEOUT_MS / 1000}; 0 waits for ever)
  --platform OS/ARCH[/VAR]  pick this platform from multi-arch images (see platforms REF)
  --cache DIR               keep verified blobs in DIR (blobs/sha256/..., shared by processes)
  --cache-size SIZE         the most the cache may hold: bytes, or with K, M, G, T (powers of
                            1024; default 10G)
  --skopeo CMD              command that starts skopeo, split on whitespace
                            (default: "setpriv --pdeathsig SIGTERM -- skopeo")
  --debug                   pass --debug to skopeo and show its messages
  -q, --quiet               no progress display
  -h, --help                show help (for a command: COMMAND --help)`;

/** The full help text. */
export function mainHelp(): string {
  const width = Math.max(...Object.values(COMMANDS).map((c) => c.usage.length));
  const commands = Object.values(COMMANDS)
    .map((c) => `  ${c.usage.padEnd(width)}  ${c.summary}`)
    .join("\n");
  return `${PROGRAM}: fetch container images through skopeo's experimental-image-proxy

Usage: ${PROGRAM} [OPTIONS] COMMAND ARGS...

Commands:
${commands}

REF is TRANSPORT:NAME as skopeo takes it: docker://quay.io/fedora/fedora:40, oci:DIR:TAG,
oci-archive:FILE, docker-archive:FILE, dir:DIR, containers-storage:NAME.

${GLOBAL_HELP}

Output is JSON on standard output (blob bytes for blob and blob-raw; ls, cat, export and
platforms print what their help says). Exit status: 0 on success, 1 on failure (one line
"error: ..." on standard error), 2 on bad usage. Progress is shown on standard error when it is a
terminal.
`;
}

/** The help text of one command. */
export function commandHelp(command: string): string {
  const spec = COMMANDS[command];
  return `Usage: ${PROGRAM} [OPTIONS] ${spec.usage}

${spec.help}

${GLOBAL_HELP}
`;
}

/** The one-line usage hint shown with a usage error. */
export function usageHint(command: string | undefined): string {
  if (command !== undefined && command in COMMANDS) {
    return `usage: ${PROGRAM} [OPTIONS] ${COMMANDS[command].usage} (see "${PROGRAM} ${command} --help")`;
  }
  return `usage: ${PROGRAM} [OPTIONS] COMMAND ARGS... (see "${PROGRAM} --help")`;
}
