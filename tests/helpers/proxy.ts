/**
 * Running a test body against a fresh proxy on a real skopeo, with the checks every such test shares.
 */

import assert from "node:assert/strict";
import { ImageProxy, type ImageProxyConfig, type TransportFactory } from "../../mod.ts";
import { defaultTransportFactory } from "../../src/runtime/detect.ts";
import { childPids } from "./concurrency-procs.ts";
import { assertNoLeakedFds, openFds, processAlive, type Server, waitFor } from "./env.ts";

/**
 * Runs `body` with a fresh proxy on `server`, then checks that shutdown succeeds, skopeo exits, no fd
 * leaked and no child process is left behind.
 */
export async function withProxy(
  server: Server,
  body: (proxy: ImageProxy) => Promise<void> | void,
  config: ImageProxyConfig = {},
): Promise<void> {
  const before = openFds();
  const children = childPids();
  const proxy = await ImageProxy.spawn({ skopeoCmd: server.skopeoCmd, ...config });
  const pid = proxy.pid!;
  try {
    await body(proxy);
  } finally {
    await proxy.shutdown();
  }
  await waitFor(() => !processAlive(pid), 5000, `skopeo ${pid} to exit`);
  await assertNoLeakedFds(before);
  assert.deepEqual(childPids(), children, "no child process is left behind");
}

/**
 * The runtime's own transport factory with `openFileSink` hidden: a transport that cannot save blobs,
 * as a third-party or scripted one may be.
 */
export async function withoutFileSinks(): Promise<TransportFactory> {
  const real = await defaultTransportFactory();
  return {
    env: real.env,
    spawn: async (request) => {
      const t = await real.spawn(request);
      return {
        request: (packet) => t.request(packet),
        send: (packet) => t.send(packet),
        openStream: (fd, options) => t.openStream(fd, options),
        closeFd: (fd) => t.closeFd(fd),
        pipeFill: t.pipeFill && ((fd) => t.pipeFill!(fd)),
        createHasher: t.createHasher && ((algorithm) => t.createHasher!(algorithm)),
        exited: t.exited,
        pid: t.pid,
        close: (graceMs) => t.close(graceMs),
      };
    },
  };
}

/**
 * The runtime's own transport factory, recording the method of every request its proxies send (in
 * `methods`): what reached skopeo, whatever wraps the proxy's methods above the transport.
 */
export async function countingTransport(): Promise<{ factory: TransportFactory; methods: string[] }> {
  const real = await defaultTransportFactory();
  const methods: string[] = [];
  const record = (packet: Uint8Array) => {
    methods.push(JSON.parse(new TextDecoder().decode(packet)).method);
  };
  const factory: TransportFactory = {
    env: real.env,
    spawn: async (request) => {
      const t = await real.spawn(request);
      return {
        request: (packet) => {
          record(packet);
          return t.request(packet);
        },
        requestNow: t.requestNow && ((packet) => {
          record(packet);
          return t.requestNow!(packet);
        }),
        send: (packet) => t.send(packet),
        openStream: (fd, options) => t.openStream(fd, options),
        openFileSink: t.openFileSink && ((fd, path, options) => t.openFileSink!(fd, path, options)),
        closeFd: (fd) => t.closeFd(fd),
        pipeFill: t.pipeFill && ((fd) => t.pipeFill!(fd)),
        createHasher: t.createHasher && ((algorithm) => t.createHasher!(algorithm)),
        exited: t.exited,
        pid: t.pid,
        close: (graceMs) => t.close(graceMs),
      };
    },
  };
  return { factory, methods };
}
