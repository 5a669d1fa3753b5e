import { test } from "node:test";
import assert from "node:assert/strict";
import type { ImageProxy, OpenedImage } from "../mod.ts";
import {
  DiffIdMismatchError,
  exportImage,
  FileNotFoundError,
  listImage,
  NotAFileError,
  readFile,
  SymlinkLoopError,
} from "../src/image/inspect.ts";
import { assertNoLeakedFds, openFds, readAll, SERVERS } from "./helpers/env.ts";
import { digestOf, layer, tempDir, writeOciLayout } from "./helpers/cli-helpers.ts";
import { buildFixtures, tar } from "./helpers/fixtures.ts";
import { debPackage, debTar, stackedImage } from "./helpers/stacked.ts";
import { withProxy } from "./helpers/proxy.ts";
import { execFileSync } from "node:child_process";

const stacked = stackedImage();
const skip = "skip" in stacked ? stacked.skip : false;

/** Counts the layer blobs fetched through `proxy`, by index in `layers`. */
function countFetches(proxy: ImageProxy, layers: string[]): number[] {
  const fetched: number[] = [];
  const getBlob = proxy.getBlob.bind(proxy);
  proxy.getBlob = (image, digest, size, options) => {
    fetched.push(layers.indexOf(digest));
    return getBlob(image, digest, size, options);
  };
  return fetched;
}

async function text(stream: ReadableStream<Uint8Array>): Promise<string> {
  return new TextDecoder().decode(await readAll(stream));
}

/** What `path` holds in the package's own file tree, as GNU tar extracts it. */
function fromDeb(pkg: string, path: string): string {
  const deb = debPackage(pkg);
  if ("skip" in deb) throw new Error(deb.skip);
  return execFileSync("tar", ["-xOf", "-", `./${path}`], { input: debTar(deb.path) }).toString();
}

for (const server of SERVERS) {
  const withImage = async (
    body: (proxy: ImageProxy, image: OpenedImage, fetched: number[]) => Promise<void>,
  ) => {
    if ("skip" in stacked) return;
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(stacked.ref);
      const digests = (await proxy.fetchManifest(image)).manifest.layers.map((l) => l.digest);
      const fetched = countFetches(proxy, digests);
      await body(proxy, image, fetched);
      await proxy.closeImage(image);
    });
  };

  test(
    `readFile of a path in the top layer fetches only the top layer (${server.name})`,
    { skip },
    async () => {
      await withImage(async (proxy, image, fetched) => {
        assert.equal(await text(await readFile(proxy, image, "/srv/top.txt")), "from the top layer\n");
        assert.deepEqual(fetched, [3]);
      });
    },
  );

  test(
    `readFile stops at the layer that holds the path and never reads below it (${server.name})`,
    { skip },
    async () => {
      await withImage(async (proxy, image, fetched) => {
        assert.equal(await text(await readFile(proxy, image, "etc/debian_version")), "99.9\n");
        assert.deepEqual(fetched, [3, 2]);
        fetched.length = 0;
        assert.equal(
          await text(await readFile(proxy, image, "etc/issue.net")),
          fromDeb("base-files", "etc/issue.net"),
        );
        assert.deepEqual(fetched, [3, 2, 1, 0]);
      });
    },
  );

  test(`readFile stops at a whiteout or an opaque parent and reports the path missing (${server.name})`, {
    skip,
  }, async () => {
    await withImage(async (proxy, image, fetched) => {
      for (
        const path of [
          "etc/host.conf",
          "usr/share/zoneinfo/America/Chicago",
          "usr/share/zoneinfo/Africa/Cairo",
        ]
      ) {
        fetched.length = 0;
        await assert.rejects(readFile(proxy, image, path), (err: unknown) => {
          assert.ok(err instanceof FileNotFoundError, `${path}: got ${err}`);
          assert.equal(err.path, path);
          assert.match(err.message, new RegExp(`"${path}"`));
          return true;
        });
        assert.deepEqual(fetched, [3, 2], `${path} is decided by layer 2`);
      }
    });
  });

  test(
    `readFile follows symlinks inside the root, relative, absolute, escaping and through directories (${server.name})`,
    { skip },
    async () => {
      await withImage(async (proxy, image) => {
        const zone = fromDeb("tzdata", "usr/share/zoneinfo/Asia/Tokyo");
        assert.equal(await text(await readFile(proxy, image, "srv/relative")), "from the top layer\n");
        assert.equal(await text(await readFile(proxy, image, "srv/absolute")), "from the top layer\n");
        assert.equal(await text(await readFile(proxy, image, "srv/escape")), "99.9\n");
        assert.equal(await text(await readFile(proxy, image, "srv/zones/Asia/Tokyo")), zone);
        assert.equal(await text(await readFile(proxy, image, "usr/share/zoneinfo/Europe/Tokyo")), zone);
        assert.equal(
          await text(await readFile(proxy, image, "srv/zones/../../../etc/debian_version")),
          "99.9\n",
        );
        assert.equal(
          await text(await readFile(proxy, image, "usr/share/zoneinfo/Japan")),
          zone,
          "tzdata's own symlink",
        );
      });
    },
  );

  test(
    `readFile searches the layers it already read from memory when a symlink restarts the search (${server.name})`,
    { skip },
    async () => {
      await withImage(async (proxy, image, fetched) => {
        const cases: [string, number[]][] = [
          ["srv/absolute", [3, 3]], // Read once to find the symlinks, once more for the file's bytes.
          ["srv/zones/Asia/Tokyo", [3, 2, 1]],
          ["usr/share/zoneinfo/Japan", [3, 2, 1, 1]],
        ];
        for (const [path, layers] of cases) {
          fetched.length = 0;
          await readAll(await readFile(proxy, image, path));
          assert.deepEqual(fetched, layers, path);
        }
      });
    },
  );

  test(`readFile resolves a hardlink to its target's content as of the hardlink's layer (${server.name})`, {
    skip,
  }, async () => {
    await withImage(async (proxy, image) => {
      assert.equal(await text(await readFile(proxy, image, "opt/kept-too")), "kept by both names\n");
      assert.equal(
        await text(await readFile(proxy, image, "opt/survivor")),
        "the old content, kept by its other name\n",
      );
      assert.equal(await text(await readFile(proxy, image, "opt/replaced")), "the new content\n");
    });
  });

  test(`readFile fails with typed errors for a directory, a dangling symlink and a loop (${server.name})`, {
    skip,
  }, async () => {
    await withImage(async (proxy, image) => {
      await assert.rejects(readFile(proxy, image, "etc"), (err: unknown) => {
        assert.ok(err instanceof NotAFileError, `got ${err}`);
        assert.equal(err.type, "dir");
        assert.match(err.message, /"etc": it is a directory/);
        return true;
      });
      await assert.rejects(readFile(proxy, image, "/"), NotAFileError);
      await assert.rejects(readFile(proxy, image, "srv/dangling"), FileNotFoundError);
      await assert.rejects(readFile(proxy, image, "etc/debian_version/x"), FileNotFoundError);
      await assert.rejects(readFile(proxy, image, "srv/loop-a"), (err: unknown) => {
        assert.ok(err instanceof SymlinkLoopError, `got ${err}`);
        assert.equal(err.path, "srv/loop-a");
        return true;
      });
    });
  });

  test(`readFile errors the stream when the file's layer does not match its diff id (${server.name})`, async () => {
    const dir = tempDir("read-file-diffid");
    const bottom = layer(tar([{ name: "a.txt", content: "bottom\n" }]), "gzip");
    const top = layer(
      tar([{ name: "b.txt", content: "top\n" }, { name: "c.txt", content: "after\n" }]),
      "gzip",
    );
    writeOciLayout(dir, [bottom, top], { diffIds: [digestOf(bottom.tar), digestOf("wrong")] });
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(`oci:${dir}:latest`);
      const stream = await readFile(proxy, image, "b.txt");
      await assert.rejects(
        readAll(stream),
        (err: unknown) => err instanceof DiffIdMismatchError && err.index === 1,
      );
      await assert.rejects(
        readFile(proxy, image, "a.txt"),
        DiffIdMismatchError,
        "a lower layer is reached only through a checked one",
      );
      assert.equal(await text(await readFile(proxy, image, "a.txt", { verifyDiffIds: false })), "bottom\n");
      await proxy.closeImage(image);
    });
  });
}

for (const server of SERVERS) {
  test(`cancelling readFile's and exportImage's streams early leaves the proxy usable, with no fd left open (${server.name})`, async () => {
    const f = buildFixtures();
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(`oci:${f.layout}:latest`);
      const before = openFds();
      const partial = (await readFile(proxy, image, "usr/share/big.bin")).getReader();
      assert.ok(!(await partial.read()).done);
      await partial.cancel();
      const tarReader = exportImage(proxy, image).getReader();
      assert.ok(!(await tarReader.read()).done);
      await tarReader.cancel();
      await assertNoLeakedFds(before); // The layers' pipes were closed, not left to the shutdown.
      assert.equal(await text(await readFile(proxy, image, "etc/motd")), "welcome\n");
      await proxy.closeImage(image);
    });
  });
}

for (const server of SERVERS) {
  test(`readFile agrees with the view when a layer writes through a lower layer's symlink (${server.name})`, async () => {
    const dir = tempDir("read-through-links");
    writeOciLayout(dir, [
      layer(
        tar([
          { name: "real/", type: "dir" },
          { name: "real/x", content: "old x\n" },
          { name: "real/z", content: "z\n" },
          { name: "etc", type: "symlink", linkname: "real" },
          { name: "other/", type: "dir" },
          { name: "other/kept", content: "kept\n" },
        ]),
        "gzip",
      ),
      // No "etc/" entry: these land in real/, as extraction puts them.
      layer(
        tar([
          { name: "etc/x", content: "new x\n" },
          { name: "etc/.wh.z" },
          { name: "etc/h", type: "link", linkname: "etc/x" },
        ]),
        "gzip",
      ),
    ]);
    await withProxy(server, async (proxy) => {
      const image = await proxy.openImage(`oci:${dir}:latest`);
      const view = new Map<string, string>();
      for await (const e of listImage(proxy, image)) view.set(e.path, e.type);
      assert.equal(view.get("real/x"), "file");
      assert.equal(view.has("real/z"), false);
      assert.equal(await text(await readFile(proxy, image, "real/x")), "new x\n");
      assert.equal(await text(await readFile(proxy, image, "etc/x")), "new x\n");
      assert.equal(await text(await readFile(proxy, image, "real/h")), "new x\n");
      assert.equal(await text(await readFile(proxy, image, "other/kept")), "kept\n");
      await assert.rejects(readFile(proxy, image, "real/z"), FileNotFoundError);
      await assert.rejects(readFile(proxy, image, "etc/z"), FileNotFoundError);
      await proxy.closeImage(image);
    });
  });
}
