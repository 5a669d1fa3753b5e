/**
 * A long-lived parent of skopeo, run as its own runtime process by tests/concurrency_test.ts.
 * Argument: JSON `{ binary?: string[], ref: string, mode: "hang" | "idle" | "leave" }`.
 *
 * It starts an ImageProxy with the default `setpriv --pdeathsig SIGTERM` prefix (in front of `binary`
 * when one is given) and prints `{"pid": N}` on stdout. Then:
 * - `hang`: opens `ref` (a registry that never answers), so skopeo is stuck inside a request and will
 *   not notice our socket closing: only the parent-death signal can end it;
 * - `idle`: does nothing until a line arrives on stdin: `manifest` fetches `ref`'s manifest and prints
 *   `{"digest": ...}`, `exit` shuts the proxy down and exits 0;
 * - `leave`: does nothing more, so the program must end by itself: an idle proxy keeps nothing alive.
 */

import { createInterface } from "node:readline";
import { DEFAULT_SKOPEO_CMD, ImageProxy } from "../../mod.ts";

const { binary, ref, mode } = JSON.parse(process.argv[process.argv.length - 1]) as {
  binary?: string[];
  ref: string;
  mode: "hang" | "idle" | "leave";
};
const skopeoCmd = binary ? [...DEFAULT_SKOPEO_CMD.slice(0, -1), ...binary] : undefined;
const proxy = await ImageProxy.spawn({ skopeoCmd, insecureSkipTlsVerification: true });

function say(value: object): void {
  process.stdout.write(JSON.stringify(value) + "\n");
}

say({ pid: proxy.pid });
// Something must keep the event loop alive while the proxy is idle, except when that is the test.
const keepAlive = setInterval(() => {}, 1000);
if (mode === "leave") clearInterval(keepAlive);

if (mode === "leave") {
  // Nothing: the event loop has no more work of ours.
} else if (mode === "hang") {
  say({ opening: ref });
  await proxy.openImage(ref).catch((err) => say({ error: String(err) }));
} else {
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line === "manifest") {
      try {
        const img = await proxy.openImage(ref);
        const { digest } = await proxy.fetchManifest(img);
        await proxy.closeImage(img);
        say({ digest });
      } catch (err) {
        say({ error: String(err) });
      }
    } else if (line === "exit") {
      break;
    }
  }
  await proxy.shutdown();
  clearInterval(keepAlive);
  say({ exited: true });
  process.exit(0);
}
