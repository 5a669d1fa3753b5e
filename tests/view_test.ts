import { test } from "node:test";
import assert from "node:assert/strict";
import type { ImageProxy } from "../mod.ts";
import {
  DiffIdMismatchError,
  exportImage,
  type FileEntry,
  findInImage,
  listImage,
  readFile,
} from "../src/image/inspect.ts";
import { extractImage, LayerError, UnsafeEntryError } from "../src/image/extract.ts";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { readAll, SERVERS } from "./helpers/env.ts";
import { noise, tar } from "./helpers/fixtures.ts";
import {
  concatBytes,
  digestOf,
  layer,
  padded,
  rawHeader,
  tempDir,
  writeOciLayout,
} from "./helpers/cli-helpers.ts";
import { gnuTarListing, stackedImage, type TarListing, unpackWithGnuTar } from "./helpers/stacked.ts";
import { withProxy } from "./helpers/proxy.ts";

const stacked = stackedImage();
const skip = "skip" in stacked ? stacked.skip : false;

const KINDS: Record<string, string> = {
  file: "-",
  dir: "d",
  symlink: "l",
  hardlink: "h",
  char: "c",
  block: "b",
  fifo: "p",
};

function asListing(e: FileEntry): TarListing {
  return {
    path: e.path,
    kind: KINDS[e.type],
    mode: e.mode,
    uid: e.uid,
    gid: e.gid,
    size: e.size,
    mtime: e.type === "dir" ? 0 : Math.floor(e.mtime),
    linkname: e.linkname,
  };
}

async function collect(iterable: AsyncIterable<FileEntry>): Promise<FileEntry[]> {
  const out: FileEntry[] = [];
  for await (const e of iterable) out.push(e);
  return out;
}

for (const server of SERVERS) {
  test(
    `the merged view lists what GNU tar unpacks with the whiteouts applied (${server.name})`,
    { skip },
    async () => {
      if ("skip" in stacked) return;
      const reference = tempDir("view-reference");
      unpackWithGnuTar(stacked.tars, reference);
      await withProxy(server, async (proxy: ImageProxy) => {
        const image = await proxy.openImage(stacked.ref);
        const entries = await collect(listImage(proxy, image));
        // GNU tar changes a directory's time after setting it when it creates symlinks inside it late.
        const expected = gnuTarListing(reference).map((l) => ({ ...l, mtime: l.kind === "d" ? 0 : l.mtime }));
        assert.deepEqual(entries.map(asListing), expected);
        assert.ok(entries.length > 1000, `a real tree, got ${entries.length} entries`);
        await proxy.closeImage(image);
      });
    },
  );

  test(
    `the merged view applies whiteouts, opaque directories and type changes (${server.name})`,
    { skip },
    async () => {
      if ("skip" in stacked) return;
      await withProxy(server, async (proxy: ImageProxy) => {
        const image = await proxy.openImage(stacked.ref);
        const byPath = new Map((await collect(listImage(proxy, image))).map((e) => [e.path, e]));
        assert.ok(
          ![...byPath.keys()].some((p) => p.split("/").some((c) => c.startsWith(".wh."))),
          "no whiteout shows",
        );
        assert.equal(byPath.get("etc/host.conf"), undefined);
        assert.ok(byPath.has("etc/issue.net"), "a sibling of a whited-out file stays");
        assert.ok(![...byPath.keys()].some((p) => p.startsWith("usr/share/zoneinfo/Africa")));
        assert.deepEqual(
          [...byPath.keys()].filter((p) => p.startsWith("usr/share/zoneinfo/America/")),
          ["usr/share/zoneinfo/America/New_York"],
        );
        assert.equal(byPath.get("etc/update-motd.d")?.type, "file");
        assert.ok(![...byPath.keys()].some((p) => p.startsWith("etc/update-motd.d/")));
        assert.equal(byPath.get("etc/issue")?.type, "dir");
        assert.equal(byPath.get("etc/issue/README")?.type, "file");
        assert.equal(byPath.get("usr/share/zoneinfo/Europe")?.type, "symlink");
        assert.equal(byPath.get("usr/share/zoneinfo/Europe")?.linkname, "Asia");
        assert.ok(![...byPath.keys()].some((p) => p.startsWith("usr/share/zoneinfo/Europe/")));
        assert.deepEqual(
          [
            byPath.get("opt/kept")?.type,
            byPath.get("opt/kept-too")?.type,
            byPath.get("opt/kept-too")?.linkname,
          ],
          ["file", "hardlink", "opt/kept"],
        );
        const survivor = byPath.get("opt/survivor")!;
        assert.deepEqual([survivor.type, survivor.size, survivor.mode], ["file", 40, 0o640]);
        assert.deepEqual(
          ["etc/issue.net", "usr/share/zoneinfo/Asia/Tokyo", "etc/debian_version", "srv/top.txt"].map((p) =>
            byPath.get(p)?.layer
          ),
          [0, 1, 2, 3],
        );
        const manifest = (await proxy.fetchManifest(image)).manifest;
        assert.equal(byPath.get("srv/top.txt")?.layerDigest, manifest.layers[3].digest);
        await proxy.closeImage(image);
      });
    },
  );

  test(`find filters the merged view, and path lists one subtree (${server.name})`, { skip }, async () => {
    if ("skip" in stacked) return;
    await withProxy(server, async (proxy: ImageProxy) => {
      const image = await proxy.openImage(stacked.ref);
      const links = await collect(
        findInImage(proxy, image, (e) => e.path.startsWith("srv/") && e.type === "symlink"),
      );
      assert.deepEqual(links.map((e) => e.path), [
        "srv/absolute",
        "srv/dangling",
        "srv/escape",
        "srv/loop-a",
        "srv/loop-b",
        "srv/relative",
        "srv/zones",
      ]);
      const opt = await collect(listImage(proxy, image, { path: "/opt" }));
      assert.deepEqual(opt.map((e) => e.path), [
        "opt",
        "opt/kept",
        "opt/kept-too",
        "opt/replaced",
        "opt/survivor",
      ]);
      await proxy.closeImage(image);
    });
  });
}

/** A two-layer image whose configuration gives layer 1 a wrong diff id. */
function wrongDiffIdImage(): string {
  const dir = tempDir("view-diffid");
  const bottom = layer(new Uint8Array(execTar([["a.txt", "bottom\n"]])), "gzip");
  const top = layer(new Uint8Array(execTar([["b.txt", "top\n"]])), "gzip");
  writeOciLayout(dir, [bottom, top], { diffIds: [digestOf(bottom.tar), digestOf("something else")] });
  return `oci:${dir}:latest`;
}

function execTar(files: [string, string][]): Uint8Array {
  return tar(files.map(([name, content]) => ({ name, content })));
}

for (const server of SERVERS) {
  test(`the merged view fails with DiffIdMismatchError before yielding anything when a layer's diff id is wrong (${server.name})`, async () => {
    const ref = wrongDiffIdImage();
    await withProxy(server, async (proxy: ImageProxy) => {
      const image = await proxy.openImage(ref);
      const seen: string[] = [];
      await assert.rejects(
        (async () => {
          for await (const e of listImage(proxy, image)) seen.push(e.path);
        })(),
        (err: unknown) => {
          assert.ok(err instanceof DiffIdMismatchError, `got ${err}`);
          assert.equal(err.index, 1);
          assert.equal(err.expected, digestOf("something else"));
          return true;
        },
      );
      assert.deepEqual(seen, []);
      const unchecked = await collect(listImage(proxy, image, { verifyDiffIds: false }));
      assert.deepEqual(unchecked.map((e) => e.path), ["a.txt", "b.txt"]);
      await proxy.closeImage(image);
    });
  });
}

for (const server of SERVERS) {
  test(`the readers refuse an entry outside the root and a layer that is not a tar, with typed errors (${server.name})`, async () => {
    const escaping = tempDir("view-escape");
    const evil = concatBytes(
      rawHeader({ name: "../escaped", type: "0", size: 2 }),
      padded("x\n"),
      new Uint8Array(1024),
    );
    writeOciLayout(escaping, [layer(evil, "gzip")]);
    const garbage = tempDir("view-garbage");
    writeOciLayout(garbage, [layer(noise(4096, 3), "gzip")]);
    await withProxy(server, async (proxy: ImageProxy) => {
      const image = await proxy.openImage(`oci:${escaping}:latest`);
      await assert.rejects(collect(listImage(proxy, image)), (err: unknown) => {
        assert.ok(err instanceof UnsafeEntryError, `got ${err}`);
        assert.equal(err.entry, "../escaped");
        return true;
      });
      await assert.rejects(readAll(exportImage(proxy, image)), UnsafeEntryError);
      await assert.rejects(readFile(proxy, image, "escaped"), UnsafeEntryError);
      await proxy.closeImage(image);
      const bad = await proxy.openImage(`oci:${garbage}:latest`);
      await assert.rejects(collect(listImage(proxy, bad, { verifyDiffIds: false })), (err: unknown) => {
        assert.ok(err instanceof LayerError, `got ${err}`);
        assert.match(err.message, /Layer 0 \(sha256:[0-9a-f]+\) is not a valid tar archive/);
        return true;
      });
      await proxy.closeImage(bad);
    });
  });
}

for (const server of SERVERS) {
  test(`an entry written through symlinked parents lands where extraction puts it (${server.name})`, async () => {
    const dir = tempDir("view-through-links");
    writeOciLayout(dir, [
      layer(
        tar([
          { name: "b/", type: "dir" },
          { name: "b/c/", type: "dir" },
          { name: "b/e/", type: "dir" },
          { name: "l", type: "symlink", linkname: "b/c" },
          { name: "a", type: "symlink", linkname: "l" },
          { name: "b/c/d", type: "symlink", linkname: "../e" },
        ]),
        "gzip",
      ),
      layer(tar([{ name: "a/d/x", content: "through three links\n" }]), "gzip"),
    ]);
    const extracted = tempDir("view-through-links-extracted");
    await withProxy(server, async (proxy: ImageProxy) => {
      const image = await proxy.openImage(`oci:${dir}:latest`);
      const paths = (await collect(listImage(proxy, image))).map((e) => e.path);
      assert.ok(paths.includes("b/e/x"), `b/e/x in ${paths.join(", ")}`);
      await extractImage(proxy, image, extracted);
      assert.equal(readFileSync(join(extracted, "b/e/x"), "utf8"), "through three links\n");
      await proxy.closeImage(image);
    });
  });
}
