/**
 * A test image made of real content nobody here wrote: the file trees of two Debian packages
 * (`base-files`, `tzdata`, from `apt-get download` and `dpkg-deb --fsys-tarfile`), stacked under layers
 * that GNU tar writes from directories and that delete, replace and make opaque what lies below.
 * Also the reference the view is compared with: the same layers unpacked by GNU tar into a folder,
 * the OCI whiteout rules applied by hand between layers, and the result listed by `tar -tv`.
 *
 * The .deb files are cached in the temp folder (never in the repository). Under `CI=true` a failing
 * download fails the run; otherwise the tests that need them are skipped.
 */

import { execFileSync } from "node:child_process";
import {
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IN_CI, RUNTIME } from "./env.ts";
import { layer, type LayoutLayer, writeOciLayout } from "./cli-helpers.ts";

/** The Debian packages whose file trees the tests use as layers. */
export const DEBIAN_PACKAGES = ["base-files", "tzdata"] as const;

const DEB_CACHE = join(tmpdir(), "cip-test-debs");

/**
 * The `.deb` of `pkg`, downloaded once into the temp folder with `apt-get download`.
 * Returns a skip message when apt cannot get it outside CI; throws under `CI=true`.
 */
export function debPackage(pkg: string): { path: string } | { skip: string } {
  mkdirSync(DEB_CACHE, { recursive: true });
  const find = () =>
    readdirSync(DEB_CACHE).find((name) => name.startsWith(`${pkg}_`) && name.endsWith(".deb"));
  let found = find();
  if (found === undefined) {
    try {
      execFileSync("apt-get", ["download", pkg], { cwd: DEB_CACHE, stdio: ["ignore", "ignore", "pipe"] });
    } catch (err) {
      const message = `"apt-get download ${pkg}" failed (run "apt-get update" first?): ` +
        `${(err as { stderr?: Buffer }).stderr?.toString().trim() || (err as Error).message}`;
      if (IN_CI) throw new Error(message);
      return { skip: message };
    }
    found = find();
    if (found === undefined) throw new Error(`"apt-get download ${pkg}" left no .deb in ${DEB_CACHE}`);
  }
  return { path: join(DEB_CACHE, found) };
}

/** The package's file tree as the uncompressed tar dpkg-deb writes. */
export function debTar(deb: string): Uint8Array {
  return new Uint8Array(execFileSync("dpkg-deb", ["--fsys-tarfile", deb], { maxBuffer: 256 << 20 }));
}

/** A tar of everything in `dir`, written by GNU tar, names sorted, owned by 0:0. */
export function gnuTar(dir: string): Uint8Array {
  return new Uint8Array(
    execFileSync("tar", [
      "-C",
      dir,
      "--sort=name",
      "--numeric-owner",
      "--owner=0",
      "--group=0",
      "-cf",
      "-",
      ".",
    ], {
      maxBuffer: 256 << 20,
    }),
  );
}

/** A stacked image: its layout, its layers' tars (bottom first), and where its parts were built. */
export interface StackedImage {
  layout: string;
  ref: string;
  tars: Uint8Array[];
  manifestDigest: string;
}

const MTIME = new Date("2025-03-04T05:06:07Z");

function put(root: string, path: string, content: string, mode = 0o644): void {
  const full = join(root, path);
  mkdirSync(join(full, ".."), { recursive: true });
  writeFileSync(full, content, { mode });
}

/**
 * Builds (once per run and runtime) the stacked image:
 * 0. base-files, 1. tzdata (both as dpkg-deb writes them, compressed gzip and zstd),
 * 2. a GNU tar layer that deletes `etc/host.conf` and `usr/share/zoneinfo/Africa`, makes
 *    `usr/share/zoneinfo/America` opaque (one new file in it), replaces the directory
 *    `etc/update-motd.d` with a file, the file `etc/issue` with a directory, the directory
 *    `usr/share/zoneinfo/Europe` with a symlink, rewrites `etc/debian_version`, and adds `opt/` with two
 *    hardlink pairs;
 * 3. a top layer that replaces one name of a hardlink pair, and adds `srv/` with a file and symlinks for
 *    `readFile` (relative, absolute, escaping the root, through a directory, a loop).
 */
export function stackedImage(): StackedImage | { skip: string } {
  const root = join(tmpdir(), `cip-stacked-${RUNTIME}-v1`);
  const ready = join(root, "ready");
  const layout = join(root, "layout");
  const tarsDir = join(root, "tars");
  if (existsSync(ready)) {
    const tars = [0, 1, 2, 3].map((i) => new Uint8Array(readFileSync(join(tarsDir, `${i}.tar`))));
    return {
      layout,
      ref: `oci:${layout}:latest`,
      tars,
      manifestDigest: readFileSync(ready, "utf8"),
    };
  }
  const debs = DEBIAN_PACKAGES.map(debPackage);
  for (const deb of debs) if ("skip" in deb) return deb;
  const building = `${root}.build-${process.pid}`;
  rmSync(building, { recursive: true, force: true });
  mkdirSync(building, { recursive: true });

  const l2 = join(building, "l2");
  put(l2, "etc/.wh.host.conf", "");
  put(l2, "usr/share/zoneinfo/.wh.Africa", "");
  put(l2, "usr/share/zoneinfo/America/.wh..wh..opq", "");
  put(l2, "usr/share/zoneinfo/America/New_York", "not a zone file\n");
  put(l2, "etc/update-motd.d", "a file where a directory was\n", 0o755);
  put(l2, "etc/issue/README", "a directory where a file was\n");
  symlinkSync("Asia", join(l2, "usr/share/zoneinfo/Europe"));
  put(l2, "etc/debian_version", "99.9\n");
  put(l2, "opt/kept", "kept by both names\n");
  linkSync(join(l2, "opt/kept"), join(l2, "opt/kept-too"));
  put(l2, "opt/replaced", "the old content, kept by its other name\n", 0o640);
  linkSync(join(l2, "opt/replaced"), join(l2, "opt/survivor"));
  const l3 = join(building, "l3");
  put(l3, "opt/replaced", "the new content\n");
  put(l3, "srv/top.txt", "from the top layer\n");
  symlinkSync("top.txt", join(l3, "srv/relative"));
  symlinkSync("/srv/relative", join(l3, "srv/absolute"));
  symlinkSync("../../../../../etc/debian_version", join(l3, "srv/escape"));
  symlinkSync("/usr/share/zoneinfo", join(l3, "srv/zones"));
  symlinkSync("loop-b", join(l3, "srv/loop-a"));
  symlinkSync("loop-a", join(l3, "srv/loop-b"));
  symlinkSync("missing", join(l3, "srv/dangling"));
  for (const dir of [l2, l3]) {
    execFileSync("find", [dir, "-exec", "touch", "-h", "-d", MTIME.toISOString(), "{}", "+"]);
  }
  const tars = [
    debTar((debs[0] as { path: string }).path),
    debTar((debs[1] as { path: string }).path),
    gnuTar(l2),
    gnuTar(l3),
  ];
  const layers: LayoutLayer[] = [
    layer(tars[0], "gzip"),
    layer(tars[1], "zstd"),
    layer(tars[2], "gzip"),
    layer(tars[3], "none"),
  ];
  const { manifestDigest } = writeOciLayout(join(building, "layout"), layers);
  mkdirSync(join(building, "tars"));
  tars.forEach((t, i) => writeFileSync(join(building, "tars", `${i}.tar`), t));
  rmSync(l2, { recursive: true });
  rmSync(l3, { recursive: true });
  writeFileSync(join(building, "ready"), manifestDigest);
  rmSync(root, { recursive: true, force: true });
  try {
    renameSync(building, root);
  } catch {
    rmSync(building, { recursive: true, force: true });
  }
  return stackedImage();
}

/**
 * The reference: `tars` unpacked by GNU tar into `dir`, bottom first, applying each layer's whiteouts
 * by hand first as the OCI image spec says (`.wh.NAME` removes NAME, `.wh..wh..opq` empties its
 * directory), with the whiteout files themselves excluded.
 */
function isDirectory(path: string): boolean {
  try {
    return lstatSync(path).isDirectory();
  } catch {
    return false;
  }
}

export function unpackWithGnuTar(tars: Uint8Array[], dir: string): void {
  mkdirSync(dir, { recursive: true });
  const file = `${dir}.layer.tar`;
  for (const tarBytes of tars) {
    // A file, not stdin: Deno's execFileSync writes all input before it reads any output.
    writeFileSync(file, tarBytes);
    const listing = execFileSync("tar", ["-tv", "-f", file], { maxBuffer: 64 << 20 }).toString();
    for (const line of listing.split("\n").filter((l) => l !== "")) {
      const kind = line[0];
      let name = line.replace(/^(\S+\s+){5}/, "");
      if (kind === "l") name = name.slice(0, name.indexOf(" -> "));
      if (kind === "h") name = name.slice(0, name.indexOf(" link to "));
      const parts = name.split("/").filter((p) => p !== "" && p !== ".");
      const base = parts.at(-1) ?? "";
      const path = join(dir, ...parts);
      if (base.startsWith(".wh.")) {
        const parent = join(dir, ...parts.slice(0, -1));
        if (base === ".wh..wh..opq") {
          if (existsSync(parent)) {
            for (const child of readdirSync(parent)) rmSync(join(parent, child), { recursive: true });
          }
        } else {
          rmSync(join(parent, base.slice(4)), { recursive: true, force: true });
        }
      } else if (kind !== "d" && parts.length > 0 && isDirectory(path)) {
        // GNU tar will not put a file where a directory is; an image layer does.
        rmSync(path, { recursive: true });
      }
    }
    execFileSync(
      "tar",
      ["-C", dir, "-xf", file, "--numeric-owner", "--same-permissions", "--exclude=.wh.*"],
      { maxBuffer: 64 << 20 },
    );
  }
  rmSync(file);
}

/** One line of `tar -tv --numeric-owner --full-time`, parsed. */
export interface TarListing {
  path: string;
  /** `-`, `d`, `l`, `h` (hardlink), `c`, `b`, `p`. */
  kind: string;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  linkname: string;
}

function modeBits(text: string): number {
  let mode = 0;
  const bit = (i: number, value: number, special?: [string, string, number]) => {
    const c = text[i];
    if (c !== "-" && c !== special?.[1]) mode |= value;
    if (special && (c === special[0] || c === special[1])) mode |= special[2];
  };
  bit(1, 0o400);
  bit(2, 0o200);
  bit(3, 0o100, ["s", "S", 0o4000]);
  bit(4, 0o040);
  bit(5, 0o020);
  bit(6, 0o010, ["s", "S", 0o2000]);
  bit(7, 0o004);
  bit(8, 0o002);
  bit(9, 0o001, ["t", "T", 0o1000]);
  return mode;
}

/** GNU tar's own listing of the archive of `dir` (the folder's final state), root excluded. */
export function gnuTarListing(dir: string): TarListing[] {
  const text = execFileSync("sh", [
    "-c",
    'tar -C "$1" --sort=name -cf - . | tar -tv --numeric-owner --full-time -f -',
    "sh",
    dir,
  ], {
    env: { ...process.env, TZ: "UTC" },
    maxBuffer: 64 << 20,
  }).toString();
  const out: TarListing[] = [];
  for (const line of text.split("\n")) {
    const m = /^(\S{10}) (\d+)\/(\d+) +(\S+) (\S+ \S+) \.\/(.*)$/.exec(line);
    if (!m || m[6] === "") continue;
    let [, perms, uid, gid, size, time, rest] = m;
    let linkname = "";
    let kind = perms[0];
    const arrow = rest.indexOf(" -> ");
    const hard = rest.indexOf(" link to ");
    if (kind === "l" && arrow >= 0) [rest, linkname] = [rest.slice(0, arrow), rest.slice(arrow + 4)];
    else if (hard >= 0) {
      [rest, linkname, kind] = [rest.slice(0, hard), rest.slice(hard + 9).replace(/^\.\//, ""), "h"];
    }
    out.push({
      path: rest.replace(/\/$/, ""),
      kind,
      mode: modeBits(perms),
      uid: Number(uid),
      gid: Number(gid),
      size: Number(size),
      mtime: Date.parse(`${time.replace(" ", "T")}Z`) / 1000,
      linkname,
    });
  }
  return out;
}
