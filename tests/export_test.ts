import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import type { ImageProxy, OpenedImage } from "../mod.ts";
import { extractImage } from "../src/image/extract.ts";
import { DiffIdMismatchError, exportImage } from "../src/image/inspect.ts";
import { readAll, SERVERS } from "./helpers/env.ts";
import { digestOf, layer, runCli, tempDir, writeOciLayout } from "./helpers/cli-helpers.ts";
import { tar } from "./helpers/fixtures.ts";
import { gnuTar, stackedImage, unpackWithGnuTar } from "./helpers/stacked.ts";
import { withProxy } from "./helpers/proxy.ts";

const stacked = stackedImage();
const skip = "skip" in stacked ? stacked.skip : false;

/** GNU tar's listing of a folder, names sorted, directory times masked (see view_test.ts). */
function listing(dir: string): string[] {
  return execFileSync(
    "sh",
    ["-c", 'tar -C "$1" --sort=name -cf - . | tar -tv --numeric-owner -f -', "sh", dir],
    { env: { ...process.env, TZ: "UTC" }, maxBuffer: 64 << 20 },
  ).toString().split("\n").filter((l) => l !== "" && !l.endsWith(" ./"))
    .map((l) => l.startsWith("d") ? l.replace(/\d{4}-\d\d-\d\d \d\d:\d\d/, "TIME") : l);
}

/** Exports `ref` to a file, unpacks it with GNU tar, extracts it with extractImage, and compares. */
async function compareWithExtract(
  proxy: ImageProxy,
  image: OpenedImage,
): Promise<{ unpacked: string; names: string[] }> {
  const dir = tempDir("export");
  const archive = join(dir, "export.tar");
  writeFileSync(archive, await readAll(exportImage(proxy, image)));
  const names = execFileSync("tar", ["-tf", archive], { maxBuffer: 64 << 20 }).toString().split("\n")
    .filter((n) => n !== "");
  assert.equal(new Set(names).size, names.length, "each path once");
  assert.ok(
    !names.some((n) => n.split("/").some((c) => c.startsWith(".wh."))),
    "no whiteout or opaque marker",
  );
  const unpacked = join(dir, "unpacked");
  const extracted = join(dir, "extracted");
  mkdirSync(unpacked);
  execFileSync("tar", ["-C", unpacked, "-xpf", archive, "--numeric-owner"]);
  await extractImage(proxy, image, extracted);
  // extractImage applies no owners and no symlink times: compare without them.
  const withoutOwners = (lines: string[]) =>
    lines.map((l) =>
      l.replace(/^(\S+) \d+\/\d+ +(\S+) (\S+ \S+)/, (_, p, s, t) => `${p} ${s} ${p[0] === "l" ? "TIME" : t}`)
    );
  assert.deepEqual(withoutOwners(listing(unpacked)), withoutOwners(listing(extracted)));
  execFileSync("diff", ["-r", "--no-dereference", unpacked, extracted]);
  return { unpacked, names };
}

for (const server of SERVERS) {
  test(
    `export unpacked by GNU tar equals extractImage of the same image, each layer read once (${server.name})`,
    { skip },
    async () => {
      if ("skip" in stacked) return;
      await withProxy(server, async (proxy) => {
        const image = await proxy.openImage(stacked.ref);
        const digests = (await proxy.fetchManifest(image)).manifest.layers.map((l) => l.digest);
        const fetched: number[] = [];
        const getBlob = proxy.getBlob.bind(proxy);
        proxy.getBlob = (img, digest, size, options) => {
          fetched.push(digests.indexOf(digest));
          return getBlob(img, digest, size, options);
        };
        const { unpacked } = await compareWithExtract(proxy, image);
        assert.deepEqual(fetched.slice(0, 4), [3, 2, 1, 0], "export reads each layer once, from the top");
        const reference = tempDir("export-reference");
        unpackWithGnuTar(stacked.tars, reference);
        assert.deepEqual(listing(unpacked), listing(reference), "owners and times as the layers say");
        assert.equal(statSync(join(unpacked, "opt/kept")).ino, statSync(join(unpacked, "opt/kept-too")).ino);
        assert.equal(statSync(join(unpacked, "opt/survivor")).nlink, 1);
        assert.equal(
          readFileSync(join(unpacked, "opt/survivor"), "utf8"),
          "the old content, kept by its other name\n",
        );
        await proxy.closeImage(image);
      });
    },
  );

  test(`export keeps hardlinks to a lower layer's file and makes files of those whose target did not survive (${server.name})`, async () => {
    const dir = tempDir("export-links");
    writeOciLayout(dir, [
      layer(
        tar([{ name: "data/", type: "dir" }, { name: "data/orig", content: "v1\n" }, {
          name: "data/keep",
          content: "k\n",
        }]),
        "gzip",
      ),
      layer(
        tar([{ name: "data/link", type: "link", linkname: "data/orig" }, {
          name: "data/link2",
          type: "link",
          linkname: "data/keep",
        }]),
        "gzip",
      ),
      layer(tar([{ name: "data/orig", content: "v2\n" }]), "gzip"),
    ]);
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(`oci:${dir}:latest`);
      const { unpacked } = await compareWithExtract(proxy, image);
      assert.equal(readFileSync(join(unpacked, "data/link"), "utf8"), "v1\n");
      assert.equal(readFileSync(join(unpacked, "data/orig"), "utf8"), "v2\n");
      assert.equal(statSync(join(unpacked, "data/link2")).ino, statSync(join(unpacked, "data/keep")).ino);
      await proxy.closeImage(image);
    });
  });

  test(`export writes PAX headers for long names and link targets (${server.name})`, async () => {
    const dir = tempDir("export-long");
    const tree = join(dir, "tree");
    const deep = Array.from({ length: 12 }, (_, i) => `directory-number-${i}-${"x".repeat(10)}`).join("/");
    mkdirSync(join(tree, deep), { recursive: true });
    writeFileSync(join(tree, deep, `${"f".repeat(120)}.txt`), "deep\n");
    symlinkSync(`/${deep}/${"f".repeat(120)}.txt`, join(tree, "long-link"));
    writeOciLayout(join(dir, "layout"), [layer(gnuTar(tree), "gzip")]);
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(`oci:${join(dir, "layout")}:latest`);
      const { unpacked } = await compareWithExtract(proxy, image);
      assert.ok(`${deep}/${"f".repeat(120)}.txt`.length > 255);
      assert.equal(readlinkSync(join(unpacked, "long-link")), `/${deep}/${"f".repeat(120)}.txt`);
      assert.ok(existsSync(join(unpacked, deep, `${"f".repeat(120)}.txt`)));
      await proxy.closeImage(image);
    });
  });

  test(`export errors its stream with DiffIdMismatchError, and the CLI leaves no file behind (${server.name})`, async () => {
    const dir = tempDir("export-diffid");
    const bottom = layer(tar([{ name: "a.txt", content: "a\n" }]), "gzip");
    const top = layer(tar([{ name: "b.txt", content: "b\n" }]), "gzip");
    writeOciLayout(dir, [bottom, top], { diffIds: [digestOf("wrong"), digestOf(top.tar)] });
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(`oci:${dir}:latest`);
      await assert.rejects(
        readAll(exportImage(proxy, image)),
        (err: unknown) => err instanceof DiffIdMismatchError && err.index === 0,
      );
      await proxy.closeImage(image);
    });
    const output = join(dir, "out.tar");
    const result = runCli([
      "--skopeo",
      server.skopeoCmd.join(" "),
      "export",
      `oci:${dir}:latest`,
      "-o",
      output,
    ]);
    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stderr, /^error: .*does not match its diff id/);
    assert.equal(result.stderr.trimEnd().split("\n").length, 1);
    assert.ok(!existsSync(output), "no partial export is left");
  });

  test(`the export command writes the same tar to stdout and to -o FILE (${server.name})`, { skip }, () => {
    if ("skip" in stacked) return;
    const dir = tempDir("export-cli");
    const cli = (...args: string[]) => runCli(["--skopeo", server.skopeoCmd.join(" "), ...args]);
    const toStdout = cli("export", stacked.ref);
    assert.equal(toStdout.status, 0, toStdout.stderr);
    const file = join(dir, "rootfs.tar");
    const toFile = cli("export", stacked.ref, "-o", file);
    assert.equal(toFile.status, 0, toFile.stderr);
    assert.equal(toFile.stdout.length, 0);
    assert.deepEqual(new Uint8Array(readFileSync(file)), toStdout.stdout);
    assert.match(execFileSync("tar", ["-tf", file]).toString(), /^srv\/top.txt$/m);
  });
}
