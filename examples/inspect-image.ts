// Looks inside an image without unpacking it: lists its final /etc (whiteouts applied) and prints one
// file. The same file runs under Bun and Deno:
//   bun examples/inspect-image.ts oci:/path/to/layout:tag etc/os-release
//   deno run --allow-ffi --allow-run examples/inspect-image.ts oci:/path/to/layout:tag etc/os-release
// SKOPEO (optional) is the command that starts skopeo, split on spaces.
import { ImageProxy } from "../mod.ts";
import { listImage, readFile } from "../src/image/inspect.ts";

const args = (globalThis as { Deno?: { args: string[] } }).Deno?.args ??
  (globalThis as unknown as { process: { argv: string[] } }).process.argv.slice(2);
const [ref, path] = args;
if (!ref || !path) throw new Error("usage: inspect-image.ts TRANSPORT:NAME PATH");
const skopeo = (globalThis as unknown as { process?: { env: Record<string, string | undefined> } }).process
  ?.env
  .SKOPEO;

await using proxy = await ImageProxy.spawn(skopeo ? { skopeoCmd: skopeo.split(" ") } : {});
const image = await proxy.openImage(ref);
for await (const entry of listImage(proxy, image, { path: "etc" })) {
  // deno-lint-ignore no-console
  console.log(`${entry.type} ${entry.path} ${entry.size} (layer ${entry.layer})`);
}
// The stream closes normally only once the layer holding the file matched its diff id.
// deno-lint-ignore no-console
console.log(await new Response(await readFile(proxy, image, path)).text());
await proxy.closeImage(image);
