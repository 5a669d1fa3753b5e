import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { lstatSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { exportImage, listImage } from "../src/image/inspect.ts";
import { readAll, SERVERS } from "./helpers/env.ts";
import { layer, requireTool, tempDir, writeOciLayout } from "./helpers/cli-helpers.ts";
import { stackedImage } from "./helpers/stacked.ts";
import { withProxy } from "./helpers/proxy.ts";

const stacked = stackedImage();
const missing = ["bsdtar", "umoci", "python3"].map(requireTool).find((m) => m !== undefined);
const skip = "skip" in stacked ? stacked.skip : missing ?? (SERVERS.length === 0 ? "no skopeo" : false);

/** Every path below `dir` with its type, mode, owner, size and link target, as `find` prints them. */
function tree(dir: string): string {
  return execFileSync("sh", [
    "-c",
    `cd "$1" && find . -mindepth 1 -printf '%M %U %G %s %p %l\\n' | sort`,
    "sh",
    dir,
  ], {
    encoding: "utf8",
    maxBuffer: 64 << 20,
  });
}

const PYTHON_EXTRACT = `
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    kwargs = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    archive.extractall(sys.argv[2], numeric_owner=True, **kwargs)
`;

test("GNU tar, bsdtar, Python's tarfile and umoci unpack an export alike, with every directory's time", {
  skip,
}, async () => {
  if ("skip" in stacked) return;
  const dir = tempDir("export-readers");
  const archive = join(dir, "export.tar");
  const times = new Map<string, number>();
  // GNU tar makes a symlink whose target is absolute or has ".." only once the archive ends (a
  // placeholder stands in until then), which gives its directory the time of that moment.
  const delayedLinkParents = new Set<string>();
  await withProxy(SERVERS[SERVERS.length - 1], async (proxy) => {
    const image = await proxy.openImage(stacked.ref);
    writeFileSync(archive, await readAll(exportImage(proxy, image)));
    for await (const e of listImage(proxy, image)) {
      if (e.type === "dir") times.set(e.path, Math.floor(e.mtime));
      if (e.type === "symlink" && (e.linkname.startsWith("/") || e.linkname.split("/").includes(".."))) {
        delayedLinkParents.add(e.path.split("/").slice(0, -1).join("/"));
      }
    }
    await proxy.closeImage(image);
  });
  const unpacked = (name: string) => {
    const root = join(dir, name);
    mkdirSync(root);
    return root;
  };
  const gnu = unpacked("gnu");
  execFileSync("tar", ["-C", gnu, "-xpf", archive, "--numeric-owner"]);
  const bsd = unpacked("bsd");
  execFileSync("bsdtar", ["-C", bsd, "-xpf", archive, "--numeric-owner"]);
  const python = unpacked("python");
  execFileSync("python3", ["-c", PYTHON_EXTRACT, archive, python]);
  // umoci unpacks the export as the one layer of an image, as re-importing it would.
  const layout = join(dir, "layout");
  writeOciLayout(layout, [
    layer(new Uint8Array(execFileSync("cat", [archive], { maxBuffer: 64 << 20 })), "none"),
  ]);
  execFileSync("umoci", ["unpack", "--image", `${layout}:latest`, join(dir, "bundle")], { stdio: "pipe" });
  const umoci = join(dir, "bundle", "rootfs");

  assert.ok(times.size > 50, `the image has directories (${times.size})`);
  const expected = tree(gnu);
  for (const root of [gnu, bsd, python, umoci]) {
    if (root !== gnu) {
      assert.equal(tree(root), expected, root);
      execFileSync("diff", ["-r", "--no-dereference", gnu, root]);
    }
    const wrong = [...times].filter(([path, time]) =>
      Math.floor(lstatSync(join(root, path)).mtimeMs / 1000) !== time &&
      !(root === gnu && delayedLinkParents.has(path))
    );
    assert.deepEqual(wrong.map(([path]) => path), [], `directory times as the image has them (${root})`);
  }
});
