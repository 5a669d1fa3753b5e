// Fetches an image's manifest and streams every layer, verified, printing one line per layer.
// The same file runs under Bun, Deno and Node:
//   bun examples/fetch-layers.ts oci:/path/to/layout:tag
//   deno run --allow-ffi --allow-run examples/fetch-layers.ts oci:/path/to/layout:tag
//   node --import tsx examples/fetch-layers.ts oci:/path/to/layout:tag
// SKOPEO (optional) is the command that starts skopeo, split on spaces.
import { ImageProxy } from "../mod.ts";

const ref = (globalThis as { Deno?: { args: string[] } }).Deno?.args[0] ??
  (globalThis as unknown as { process: { argv: string[] } }).process.argv[2];
if (!ref) throw new Error("usage: fetch-layers.ts TRANSPORT:NAME");
const skopeo = (globalThis as unknown as { process?: { env: Record<string, string | undefined> } }).process
  ?.env
  .SKOPEO;

await using proxy = await ImageProxy.spawn(skopeo ? { skopeoCmd: skopeo.split(" ") } : {});
const image = await proxy.openImage(ref);
const { digest, manifest } = await proxy.fetchManifest(image);
// deno-lint-ignore no-console
console.log(`${ref} ${digest} (protocol ${proxy.protocolVersion})`);
for (const layer of manifest.layers) {
  const { stream } = await proxy.getDescriptor(image, layer);
  let bytes = 0;
  for await (const chunk of stream) bytes += chunk.length;
  // The loop ended normally, so skopeo confirmed size and digest.
  // deno-lint-ignore no-console
  console.log(`${layer.digest} ${bytes} bytes verified`);
}
await proxy.closeImage(image);
