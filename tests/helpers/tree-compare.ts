/**
 * Compares two directory trees entry by entry, names as bytes: type, mode, owners, size, content,
 * link targets, hardlink groups, xattrs and times to the nanosecond. The fidelity test holds
 * `extractImage` to GNU tar with it (issue 14).
 *
 * The trees are read by `find`, `sha256sum` and `getfattr`, under every runtime alike: Deno's node:fs
 * loses the bytes of names that are not UTF-8, and these tools neither decode nor follow anything.
 */

import { execFileSync } from "node:child_process";

/**
 * What can differ between two trees. A difference on the root directory itself is reported as
 * `root-ASPECT`; a path present in one tree only is `presence`, or `non-utf8-names` when its name is
 * not valid UTF-8 or holds U+FFFD (what a lossy decoder makes of such a name).
 */
export type Aspect =
  | "presence"
  | "non-utf8-names"
  | "type"
  | "mode"
  | "mode-special"
  | "owners"
  | "size"
  | "content"
  | "holes"
  | "symlink-target"
  | "hardlinks"
  | "xattrs"
  | "mtime"
  | "mtime-ns"
  | "symlink-mtime"
  | "root-mode"
  | "root-owners"
  | "root-mtime"
  | "root-xattrs";

/** One difference between the expected tree and the actual one. */
export interface Difference {
  /** The path relative to the root (`.` for the root), bytes that are not printable ASCII as `\xNN`. */
  path: string;
  /** Which property differs. */
  aspect: Aspect;
  /** The expected tree's value, as text. */
  expected: string;
  /** The actual tree's value, as text. */
  actual: string;
}

/** One entry of a tree, as `find` and friends saw it. */
export interface TreeEntry {
  /** `f` file, `d` directory, `l` symlink, `p` FIFO, `c`/`b` devices, `s` socket. */
  type: string;
  /** The permission bits with setuid, setgid and sticky. */
  mode: number;
  /** The owner's numeric id. */
  uid: number;
  /** The group's numeric id. */
  gid: number;
  /** Bytes (files); the apparent size. */
  size: number;
  /** 512-byte blocks allocated (fewer than the size needs: the file has holes). */
  blocks: number;
  /** Modification time in nanoseconds since the epoch. */
  mtime: bigint;
  /** The inode number, which tells hardlinks apart. */
  inode: number;
  /** A symlink's target, escaped as paths are. */
  target: string;
  /** SHA-256 of a file's content (holes read as zeros). */
  sha256?: string;
  /** Extended attributes, name to hex value. */
  xattrs: Record<string, string>;
  /** The other paths of the tree that share this file's inode, sorted. */
  hardlinks: string[];
}

/** A path's bytes as text: printable ASCII as is (backslash doubled), every other byte as `\xNN`. */
export function escapeBytes(bytes: Uint8Array): string {
  let out = "";
  for (const byte of bytes) {
    if (byte === 0x5c) out += "\\\\";
    else if (byte >= 0x20 && byte < 0x7f) out += String.fromCharCode(byte);
    else out += `\\x${byte.toString(16).padStart(2, "0")}`;
  }
  return out;
}

function splitNul(data: Uint8Array): Uint8Array[] {
  const fields: Uint8Array[] = [];
  let start = 0;
  for (let i = 0; i < data.length; i++) {
    if (data[i] === 0) {
      fields.push(data.subarray(start, i));
      start = i + 1;
    }
  }
  return fields;
}

function run(command: string, args: string[], cwd: string): Uint8Array {
  return new Uint8Array(
    execFileSync(command, args, { cwd, maxBuffer: 1 << 30, stdio: ["ignore", "pipe", "pipe"] }),
  );
}

/** `./a/b` (as the tools print it) to the key `a/b`; the root is `.`. */
function keyOf(bytes: Uint8Array): string {
  const text = escapeBytes(bytes);
  return text === "." ? "." : text.replace(/^\.\//, "");
}

/** Undoes getfattr's escaping of names (octal `\ooo`). */
function unescapeOctal(bytes: Uint8Array): Uint8Array {
  const out: number[] = [];
  for (let i = 0; i < bytes.length; i++) {
    const digits = String.fromCharCode(...bytes.subarray(i + 1, i + 4));
    if (bytes[i] === 0x5c && /^[0-7]{3}$/.test(digits)) {
      out.push(parseInt(digits, 8));
      i += 3;
    } else out.push(bytes[i]);
  }
  return new Uint8Array(out);
}

/**
 * Reads every entry under `root` (included, as `.`), without following any symlink.
 *
 * @param root the tree's top directory.
 * @returns entries by escaped relative path.
 */
export function readTree(root: string): Map<string, TreeEntry> {
  const entries = new Map<string, TreeEntry>();
  const fields = splitNul(
    run("find", [".", "-printf", "%p\\0%y\\0%m\\0%U\\0%G\\0%s\\0%b\\0%T@\\0%i\\0%l\\0"], root),
  );
  const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  for (let i = 0; i + 10 <= fields.length; i += 10) {
    const [seconds, fraction = ""] = text(fields[i + 7]).split(".");
    entries.set(keyOf(fields[i]), {
      type: text(fields[i + 1]),
      mode: parseInt(text(fields[i + 2]), 8),
      uid: Number(text(fields[i + 3])),
      gid: Number(text(fields[i + 4])),
      size: Number(text(fields[i + 5])),
      blocks: Number(text(fields[i + 6])),
      mtime: BigInt(seconds) * 1_000_000_000n + BigInt(fraction.padEnd(9, "0").slice(0, 9)),
      inode: Number(text(fields[i + 8])),
      target: escapeBytes(fields[i + 9]),
      xattrs: {},
      hardlinks: [],
    });
  }
  // `sha256sum -z` neither escapes names nor ends lines with anything but NUL: "HEX  NAME\0".
  for (
    const line of splitNul(run("sh", ["-c", "find . -type f -print0 | xargs -0r sha256sum -z --"], root))
  ) {
    const entry = entries.get(keyOf(line.subarray(66)));
    if (entry) entry.sha256 = text(line.subarray(0, 64));
  }
  // getfattr prints "# file: NAME" (octal escapes), then "name=0xHEX" lines, then a blank line.
  const dump = run("getfattr", [
    "--recursive",
    "--physical",
    "--no-dereference",
    "--dump",
    "--match=-",
    "--encoding=hex",
    "--absolute-names",
    ".",
  ], root);
  let current: TreeEntry | undefined;
  let start = 0;
  for (let i = 0; i <= dump.length; i++) {
    if (i < dump.length && dump[i] !== 0x0a) continue;
    const line = dump.subarray(start, i);
    start = i + 1;
    const prefix = "# file: ";
    if (text(line.subarray(0, prefix.length)) === prefix) {
      current = entries.get(keyOf(unescapeOctal(line.subarray(prefix.length))));
    } else if (line.length > 0 && current) {
      const [name, value] = text(line).split(/=(.*)/s);
      current.xattrs[name] = value ?? "";
    }
  }
  const byInode = new Map<number, string[]>();
  for (const [path, entry] of entries) {
    if (entry.type !== "f") continue;
    const group = byInode.get(entry.inode) ?? [];
    group.push(path);
    byInode.set(entry.inode, group);
  }
  for (const group of byInode.values()) {
    if (group.length < 2) continue;
    for (const path of group) entries.get(path)!.hardlinks = group.filter((p) => p !== path).sort();
  }
  return entries;
}

/** Whether an escaped path names something a lossy UTF-8 decoder would have changed. */
function notUtf8(path: string): boolean {
  const bytes: number[] = [];
  for (let i = 0; i < path.length; i++) {
    if (path[i] === "\\" && path[i + 1] === "x") {
      bytes.push(parseInt(path.slice(i + 2, i + 4), 16));
      i += 3;
    } else if (path[i] === "\\") {
      bytes.push(0x5c);
      i += 1;
    } else bytes.push(path.charCodeAt(i));
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(new Uint8Array(bytes)).includes("\ufffd");
  } catch {
    return true;
  }
}

/** How a difference on the root directory itself is named. */
const ROOT_ASPECTS: Partial<Record<Aspect, Aspect>> = {
  "mode": "root-mode",
  "mode-special": "root-mode",
  "owners": "root-owners",
  "xattrs": "root-xattrs",
  "mtime": "root-mtime",
  "mtime-ns": "root-mtime",
};

function octal(mode: number): string {
  return mode.toString(8).padStart(4, "0");
}

function time(ns: bigint): string {
  const text = ns.toString().padStart(10, "0");
  return `${text.slice(0, -9)}.${text.slice(-9)}`;
}

function xattrText(xattrs: Record<string, string>): string {
  return Object.keys(xattrs).sort().map((k) => `${k}=${xattrs[k]}`).join(" ") || "(none)";
}

/**
 * Every difference between two trees, entry by entry, in path order.
 *
 * @param expected the reference tree.
 * @param actual the tree under test.
 * @returns the differences; empty when the trees are the same in every aspect.
 */
export function compareTrees(expected: string, actual: string): Difference[] {
  const want = readTree(expected);
  const have = readTree(actual);
  const differences: Difference[] = [];
  const paths = [...new Set([...want.keys(), ...have.keys()])].sort();
  for (const path of paths) {
    const a = want.get(path);
    const b = have.get(path);
    const differ = (aspect: Aspect, x: string, y: string) => {
      if (x === y) return;
      differences.push({
        path,
        aspect: path === "." ? ROOT_ASPECTS[aspect] ?? aspect : aspect,
        expected: x,
        actual: y,
      });
    };
    if (a === undefined || b === undefined) {
      differ(
        notUtf8(path) ? "non-utf8-names" : "presence",
        a ? "present" : "absent",
        b ? "present" : "absent",
      );
      continue;
    }
    if (a.type !== b.type) {
      differ("type", a.type, b.type);
      continue;
    }
    differ("mode", octal(a.mode & 0o777), octal(b.mode & 0o777));
    differ("mode-special", octal(a.mode & 0o7000), octal(b.mode & 0o7000));
    differ("owners", `${a.uid}:${a.gid}`, `${b.uid}:${b.gid}`);
    differ("xattrs", xattrText(a.xattrs), xattrText(b.xattrs));
    if (a.type === "f") {
      differ("size", String(a.size), String(b.size));
      differ("content", a.sha256 ?? "", b.sha256 ?? "");
      // Only the holes GNU tar made must be there too; how many blocks the data takes is the file system's.
      const sparse = (e: TreeEntry) => e.blocks * 512 < e.size;
      if (sparse(a)) differ("holes", "sparse", sparse(b) ? "sparse" : "dense");
      differ("hardlinks", a.hardlinks.join(" ") || "(none)", b.hardlinks.join(" ") || "(none)");
    }
    if (a.type === "l") {
      differ("symlink-target", a.target, b.target);
      differ("symlink-mtime", time(a.mtime), time(b.mtime));
    } else if (a.mtime / 1_000_000n !== b.mtime / 1_000_000n) {
      differ("mtime", time(a.mtime), time(b.mtime));
    } else {
      differ("mtime-ns", time(a.mtime), time(b.mtime));
    }
  }
  return differences;
}

/** The differences as lines for an assertion message (at most `limit`). */
export function describe(differences: Difference[], limit = 40): string {
  const lines = differences.slice(0, limit).map((d) =>
    `${d.aspect} ${d.path}: expected ${d.expected}, got ${d.actual}`
  );
  if (differences.length > limit) lines.push(`... and ${differences.length - limit} more`);
  return lines.join("\n");
}
