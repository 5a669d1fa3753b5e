/**
 * A small but real root file system, built from Debian packages, as an OCI image, and the reference
 * extraction the fidelity test holds `extractImage` to (issue 14).
 *
 * The packages are fetched with `apt-get download` (cached in the temp folder, never in the
 * repository) and unpacked with `dpkg-deb -x`; then the recipe does what their maintainer scripts would
 * (file capabilities, the shadow group, setgid bits), and GNU tar makes the layers in PAX format with
 * every xattr and numeric owners. The top layer holds what real images carry and simple fixtures do
 * not: whiteouts, an opaque directory, a directory turned into a symlink, a hardlink into a lower
 * layer, two names that are not UTF-8, sub-second times, a symlink with its own time. A third layer
 * holds a PAX sparse file (format 1.0).
 *
 * The reference is GNU tar extracting the same layers in order as root (`--same-owner`, `--xattrs`),
 * with the OCI whiteout rules applied by {@linkcode applyReferenceLayer} before each layer.
 *
 * Everything is built once per recipe (the cache folder's name is a hash of it) and shared by both
 * runtimes. Without root, a tool or the Debian mirror the image cannot be built: the tests skip, except
 * under `CI=true`, where that is a failure.
 */

import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IN_CI } from "./env.ts";
import { layer, writeOciLayout } from "./cli-helpers.ts";

/**
 * The Debian packages in the image, and why each is there: capabilities (iputils-ping), setuid and
 * setgid files with the shadow group (passwd), /etc and the base directories (base-files), a thousand
 * symlinks (tzdata), a hardlink group (bzip2: bunzip2, bzcat and bzip2 are one file), and paths over
 * 100 bytes, which need PAX `path` records (a Go source package).
 */
export const ROOTFS_PACKAGES: readonly string[] = [
  "base-files",
  "iputils-ping",
  "passwd",
  "tzdata",
  "bzip2",
  "golang-github-containers-image-dev",
];

/** The tools the recipe and the reference run. */
const TOOLS = ["apt-get", "dpkg-deb", "tar", "setcap", "setfattr", "getfattr", "zstd", "find", "sha256sum"];

/**
 * The recipe: `bash -c RECIPE recipe DEB...` in an empty folder writes `layers/{base,top,sparse}.tar`.
 * Its hash names the cache, so any change here rebuilds the image.
 */
const RECIPE = String.raw`
set -euo pipefail
umask 022
export LC_ALL=C
mkdir -p tree/base tree/top tree/sparse/sparse layers
b=tree/base t=tree/top s=tree/sparse
for deb in "$@"; do dpkg-deb -x "$deb" "$b"; done

# What the packages' maintainer scripts do (and dpkg-statoverride would keep).
setcap cap_net_raw+ep "$b/bin/ping"
chown 0:42 "$b/usr/bin/chage" "$b/usr/bin/expiry"
chmod 2755 "$b/usr/bin/chage" "$b/usr/bin/expiry"
chown 0:50 "$b/var/local"
chmod 2775 "$b/var/local"
# A user's home (owned by a uid that is not root), /tmp with its sticky bit, xattrs of another namespace.
mkdir -p "$b/home/user" "$b/tmp"
printf 'export PS1\n' > "$b/home/user/.profile"
chown -R 1000:1000 "$b/home/user"
chmod 0700 "$b/home/user"
chmod 1777 "$b/tmp"
setfattr -n user.fixture -v kept "$b/etc/debian_version"
setfattr -n user.fixture -v replaced "$b/etc/issue"
touch -d @1700000000 "$b"

# The top layer, as an image builder would write it.
mkdir -p "$t/etc" "$t/bin" "$t/usr/share/doc/passwd" "$t/usr/local/bin" "$t/latin"
: > "$t/etc/.wh.issue.net"
: > "$t/usr/share/doc/.wh.bzip2"
: > "$t/usr/share/doc/passwd/.wh..wh..opq"
printf 'the only file left in this directory\n' > "$t/usr/share/doc/passwd/NOTE"
ln -s base-files "$t/usr/share/doc/tzdata"
printf 'Fixture GNU/Linux\n' > "$t/etc/issue"
# bin/bunzip2 is deleted from the archive below: the hardlink then names a file of the lower layer.
cp -p "$b/bin/bunzip2" "$t/bin/bunzip2"
ln "$t/bin/bunzip2" "$t/usr/local/bin/bz"
printf 'e grave\n' > "$t/latin/caf"$'\xe8'
printf 'e acute\n' > "$t/latin/caf"$'\xe9'
printf 'sub-second\n' > "$t/etc/subsecond"
touch -d @1700000000.123456789 "$t/etc/subsecond"
ln -s ../../../bin/bzip2 "$t/usr/local/bin/bzip2-link"
touch -h -d @1650000000 "$t/usr/local/bin/bzip2-link"
find "$t" -type d -exec touch -d @1710000000 {} +
touch -d @1705000000.987654321 "$t/latin"

# A sparse file: data at the start, in the middle and at the end of 8 MiB of holes.
truncate -s 8M "$s/sparse/holes"
printf 'head' | dd of="$s/sparse/holes" conv=notrunc status=none
printf 'middle' | dd of="$s/sparse/holes" bs=1 seek=4194304 conv=notrunc status=none
printf 'tail' | dd of="$s/sparse/holes" bs=1 seek=8388604 conv=notrunc status=none
find "$s" -exec touch -d @1720000000 {} +

pack() {
  local file=$1 dir=$2
  shift 2
  tar --create --file="$file" --directory="$dir" --format=pax --xattrs --xattrs-include='*' --numeric-owner \
    --sort=name --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' "$@" .
}
pack layers/base.tar "$b"
pack layers/top.tar "$t"
tar --delete --file=layers/top.tar ./bin/bunzip2
pack layers/sparse.tar "$s" --sparse
tar --sparse -tvf layers/sparse.tar | grep -q ' 8388608 .*sparse/holes$'
grep -aq 'GNU.sparse.major=1' layers/sparse.tar
`;

/**
 * Applies one uncompressed layer to `dir` the reference way: the OCI whiteout rules first (bash, fed
 * NUL-separated pairs of operation and path, so names stay bytes under every runtime), then GNU tar
 * as root.
 */
const APPLY = String.raw`
set -euo pipefail
export LC_ALL=C
cd "$1"
while IFS= read -r -d '' op && IFS= read -r -d '' path; do
  case "$op" in
    W) rm -rf -- "$path" ;;
    O) if [ -d "$path" ] && [ ! -L "$path" ]; then find "$path" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +; fi ;;
    N) if [ -d "$path" ] && [ ! -L "$path" ]; then rm -rf -- "$path"; fi ;;
    D) if [ -L "$path" ] || { [ -e "$path" ] && [ ! -d "$path" ]; }; then rm -f -- "$path"; fi ;;
  esac
done
tar --extract --file="$2" --preserve-permissions --same-owner --numeric-owner --xattrs --xattrs-include='*' \
  --sparse --exclude='.wh.*'
`;

/** Changes with what {@linkcode rootfsImage} writes besides the recipe's layers, so caches are rebuilt. */
const LAYOUT_VERSION = 2;

/** The built image and its reference extractions. */
export interface RootfsImage {
  /** The cache folder. */
  root: string;
  /** `oci:` reference of the image: base (gzip) and top (zstd). */
  ref: string;
  /** `oci:` reference of the image with a third, uncompressed layer holding a PAX sparse file. */
  sparseRef: string;
  /** The layers of `sparseRef`, all gzip'd: umoci 0.4 reads no zstd. */
  gzipSparseRef: string;
  /** GNU tar's extraction of `ref`. */
  reference: string;
  /** GNU tar's extraction of `sparseRef`. */
  sparseReference: string;
  /** The uncompressed layers, in order. */
  layers: { base: string; top: string; sparse: string };
}

/** Undoes GNU tar's `--quoting-style=escape` (C escapes and octal bytes). */
function unescapeTar(text: string): Buffer {
  const named: Record<string, number> = { a: 7, b: 8, f: 12, n: 10, r: 13, t: 9, v: 11, "\\": 92, " ": 32 };
  const out: number[] = [];
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== "\\") {
      out.push(text.charCodeAt(i) & 0xff);
      continue;
    }
    const octal = /^[0-7]{3}/.exec(text.slice(i + 1));
    if (octal) {
      out.push(parseInt(octal[0], 8));
      i += 3;
    } else {
      out.push(named[text[i + 1]] ?? text.charCodeAt(i + 1));
      i += 1;
    }
  }
  return Buffer.from(out);
}

/** The entries of an uncompressed layer: kind (`d` directory, anything else not) and name, as bytes. */
function listLayer(tarFile: string): { directory: boolean; name: Buffer }[] {
  const listing = execFileSync(
    "tar",
    ["--list", "--verbose", "--numeric-owner", "--quoting-style=escape", "--file", tarFile],
    { encoding: "latin1", maxBuffer: 256 << 20, env: { ...process.env, LC_ALL: "C" } },
  );
  return listing.split("\n").filter((line) => line !== "").map((line) => {
    // MODE OWNER/GROUP SIZE-OR-DEVICE DATE TIME NAME[ -> TARGET | link to TARGET]
    const match = /^(.)\S* +\S+ +(?:\d+, *)?\d+ \S+ \S+ (.*)$/.exec(line);
    if (!match) throw new Error(`Unexpected tar listing line: ${line}`);
    let name = match[2];
    if (match[1] === "l") name = name.slice(0, name.indexOf(" -> "));
    if (match[1] === "h") name = name.slice(0, name.indexOf(" link to "));
    return { directory: match[1] === "d", name: unescapeTar(name) };
  });
}

/**
 * Applies the uncompressed layer `tarFile` to `dir` as the reference does: whiteouts (`.wh.NAME`)
 * remove the lower path, an opaque marker (`.wh..wh..opq`) empties the lower directory, a non-directory
 * replaces a lower directory and a directory replaces a lower non-directory; then GNU tar extracts the
 * rest with owners, modes, xattrs, times and holes.
 *
 * @param tarFile an uncompressed layer.
 * @param dir the directory being built (it exists).
 */
export function applyReferenceLayer(tarFile: string, dir: string): void {
  const records: Buffer[] = [];
  for (const { directory, name } of listLayer(tarFile)) {
    const path = name.toString("latin1").replace(/\/+$/, "");
    const slash = path.lastIndexOf("/");
    const base = path.slice(slash + 1);
    const parent = path.slice(0, slash + 1);
    let record: [string, string];
    if (base === ".wh..wh..opq") record = ["O", parent || "."];
    else if (base.startsWith(".wh.")) record = ["W", parent + base.slice(4)];
    else record = [directory ? "D" : "N", path || "."];
    records.push(Buffer.from(`${record[0]}\0${record[1]}\0`, "latin1"));
  }
  execFileSync("bash", ["-c", APPLY, "apply", dir, tarFile], {
    input: Buffer.concat(records),
    stdio: ["pipe", "ignore", "pipe"],
  });
}

function missingTool(): string | undefined {
  // `id`, since Deno asks for --allow-sys to tell the uid.
  if (execFileSync("id", ["-u"], { encoding: "utf8" }).trim() !== "0") {
    return "the root file system fixture needs root (owners, capabilities)";
  }
  for (const tool of TOOLS) {
    if (spawnSync("sh", ["-c", `command -v ${tool}`], { stdio: "ignore" }).status !== 0) {
      return `${tool} is not installed (run .ci/setup)`;
    }
  }
  return undefined;
}

/** The packages' .deb files, downloaded once into the temp folder (running `apt-get update` if needed). */
function downloadPackages(): string[] {
  const cache = join(tmpdir(), "cip-debs");
  mkdirSync(cache, { recursive: true });
  const find = () =>
    ROOTFS_PACKAGES.map((pkg) =>
      readdirSync(cache).filter((f) => f.startsWith(`${pkg}_`) && f.endsWith(".deb"))
    );
  const missing = () => ROOTFS_PACKAGES.filter((_, i) => find()[i].length === 0);
  const download = () =>
    spawnSync("apt-get", ["download", "-q", ...missing()], { cwd: cache, encoding: "utf8", stdio: "pipe" });
  if (missing().length > 0) {
    let result = download();
    if (result.status !== 0) {
      spawnSync("apt-get", ["update", "-q"], { stdio: "ignore" });
      result = download();
    }
    if (result.status !== 0) {
      throw new Error(`apt-get download ${missing().join(" ")} failed: ${result.stderr.trim()}`);
    }
  }
  // Should the mirror have moved on since an earlier download, the cache holds two versions: either will do.
  return find().map((files) => join(cache, files.sort().at(-1)!));
}

let built: RootfsImage | string | Error | undefined;

/**
 * Builds the image and its references once (per recipe, shared by both runtimes), or says why it
 * cannot: a string is a reason to skip. Under `CI=true` a missing tool or a failed download throws.
 */
export function rootfsImage(): RootfsImage | string {
  if (built === undefined) {
    try {
      built = buildOnce();
    } catch (err) {
      // Every test that needs the image fails with the same error, without another download.
      built = err as Error;
    }
  }
  if (built instanceof Error) throw built;
  return built;
}

function buildOnce(): RootfsImage | string {
  const hash = createHash("sha256").update(String(LAYOUT_VERSION)).update(RECIPE).update(APPLY)
    .update(ROOTFS_PACKAGES.join(" "))
    .digest("hex").slice(0, 16);
  const root = join(tmpdir(), `cip-rootfs-${hash}`);
  const stamp = join(root, "ready.json");
  if (existsSync(stamp)) return JSON.parse(readFileSync(stamp, "utf8"));
  const missing = missingTool();
  let debs: string[];
  try {
    if (missing) throw new Error(missing);
    debs = downloadPackages();
  } catch (err) {
    if (IN_CI) throw err;
    return (err as Error).message;
  }

  const building = `${root}.build-${process.pid}`;
  rmSync(building, { recursive: true, force: true });
  mkdirSync(building, { recursive: true });
  execFileSync("bash", ["-c", RECIPE, "recipe", ...debs], {
    cwd: building,
    stdio: ["ignore", "ignore", "pipe"],
  });
  const tars = {
    base: join(building, "layers", "base.tar"),
    top: join(building, "layers", "top.tar"),
    sparse: join(building, "layers", "sparse.tar"),
  };
  const read = (file: string) => new Uint8Array(readFileSync(file));
  const base = layer(read(tars.base), "gzip");
  const top = layer(read(tars.top), "zstd");
  writeOciLayout(join(building, "layout"), [base, top], { tag: "latest" });
  const sparse = read(tars.sparse);
  writeOciLayout(join(building, "layout-sparse"), [base, top, layer(sparse, "none")], { tag: "latest" });
  writeOciLayout(
    join(building, "layout-gzip-sparse"),
    [base, layer(top.tar, "gzip"), layer(sparse, "gzip")],
    {
      tag: "latest",
    },
  );
  for (
    const [name, list] of [["reference", [tars.base, tars.top]], ["reference-sparse", [
      tars.base,
      tars.top,
      tars.sparse,
    ]]] as const
  ) {
    const dir = join(building, name);
    mkdirSync(dir);
    for (const tarFile of list) applyReferenceLayer(tarFile, dir);
  }
  // The tree the layers were made from is not needed any more (the layers and references are).
  rmSync(join(building, "tree"), { recursive: true, force: true });

  const image: RootfsImage = {
    root,
    ref: `oci:${join(root, "layout")}:latest`,
    sparseRef: `oci:${join(root, "layout-sparse")}:latest`,
    gzipSparseRef: `oci:${join(root, "layout-gzip-sparse")}:latest`,
    reference: join(root, "reference"),
    sparseReference: join(root, "reference-sparse"),
    layers: {
      base: join(root, "layers", "base.tar"),
      top: join(root, "layers", "top.tar"),
      sparse: join(root, "layers", "sparse.tar"),
    },
  };
  writeFileSync(join(building, "ready.json"), JSON.stringify(image));
  try {
    renameSync(building, root);
  } catch {
    // Another process built it at the same time: use theirs.
    rmSync(building, { recursive: true, force: true });
  }
  return JSON.parse(readFileSync(stamp, "utf8"));
}
