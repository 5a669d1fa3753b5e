/**
 * A registry stand-in on loopback: just enough of the registry v2 API for skopeo to open one image,
 * fetch its manifest and blobs, with faults a real registry only shows on a bad day. Repository
 * `stall` serves its layer's first half, then stops sending (the socket stays open); repository `hang`
 * never answers a manifest request. Two repositories send their layer without a Content-Length (so
 * skopeo reads until the body ends, and cannot tell its size): `endless` sends the layer's bytes, then
 * zeros forever; `stall-unsized` sends its first half, then stops. The config blob is always served
 * whole.
 */

import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { noise, sha256 } from "./fixtures.ts";

/** A blob the stand-in serves. */
export interface StandInBlob {
  digest: string;
  size: number;
  data: Uint8Array;
}

/** A running stand-in. */
export interface StandInRegistry {
  /** `127.0.0.1:PORT`. */
  host: string;
  /** `docker://127.0.0.1:PORT/NAME:latest`. */
  ref(name: StandInRepository): string;
  manifestDigest: string;
  config: StandInBlob;
  /** The layer whose body stalls after `stalledAfter` bytes. */
  layer: StandInBlob;
  stalledAfter: number;
  /** Every request seen, as `METHOD PATH`. */
  requests: string[];
  /** Responses held open on purpose (stalled layers, hanging manifests). */
  held(): number;
  /** Destroys every socket and stops listening. */
  close(): Promise<void>;
}

/** The stand-in's repositories, by the fault they show. */
export type StandInRepository = "stall" | "hang" | "endless" | "stall-unsized";

const MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json";
const REPOSITORY = "(stall|hang|endless|stall-unsized)";

/** Starts the stand-in on 127.0.0.1, on an ephemeral port. */
export async function startStandInRegistry(layerSize = 256 * 1024): Promise<StandInRegistry> {
  const layerData = noise(layerSize, 4242);
  const layer = { digest: sha256(layerData), size: layerData.length, data: layerData };
  const configBytes = new TextEncoder().encode(JSON.stringify({
    architecture: "amd64",
    os: "linux",
    config: { Cmd: ["/bin/true"] },
    rootfs: { type: "layers", diff_ids: [layer.digest] },
  }));
  const config = { digest: sha256(configBytes), size: configBytes.length, data: configBytes };
  const manifestBytes = new TextEncoder().encode(JSON.stringify({
    schemaVersion: 2,
    mediaType: MANIFEST_TYPE,
    config: {
      mediaType: "application/vnd.oci.image.config.v1+json",
      digest: config.digest,
      size: config.size,
    },
    layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", digest: layer.digest, size: layer.size }],
  }));
  const manifestDigest = sha256(manifestBytes);
  const stalledAfter = layerSize >> 1;
  const blobs = new Map([[config.digest, config], [layer.digest, layer]]);
  const requests: string[] = [];
  const sockets = new Set<Socket>();
  const heldOpen = new Set<ServerResponse>();

  const handle = (req: IncomingMessage, res: ServerResponse) => {
    const path = new URL(req.url ?? "/", "http://stand-in").pathname;
    requests.push(`${req.method} ${path}`);
    const head = req.method === "HEAD";
    res.setHeader("Docker-Distribution-API-Version", "registry/2.0");
    if (path === "/v2/" || path === "/v2") {
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": "2" });
      res.end(head ? undefined : "{}");
      return;
    }
    const manifest = new RegExp(`^/v2/${REPOSITORY}/manifests/([^/]+)$`).exec(path);
    if (manifest && (req.method === "GET" || head)) {
      if (manifest[1] === "hang") {
        heldOpen.add(res); // never answered
        return;
      }
      if (manifest[2] !== "latest" && manifest[2] !== manifestDigest) return notFound(res, head);
      res.writeHead(200, {
        "Content-Type": MANIFEST_TYPE,
        "Content-Length": String(manifestBytes.length),
        "Docker-Content-Digest": manifestDigest,
      });
      res.end(head ? undefined : manifestBytes);
      return;
    }
    const blob = new RegExp(`^/v2/${REPOSITORY}/blobs/([^/]+)$`).exec(path);
    const found = blob ? blobs.get(blob[2]) : undefined;
    if (!found || (req.method !== "GET" && !head)) return notFound(res, head);
    const unsized = found === layer && (blob![1] === "endless" || blob![1] === "stall-unsized");
    res.writeHead(200, {
      "Content-Type": "application/octet-stream",
      ...(unsized ? {} : { "Content-Length": String(found.size) }),
      "Docker-Content-Digest": found.digest,
    });
    if (head) return res.end();
    if (found === layer && blob![1] === "endless") {
      res.write(layer.data);
      // Zeros for as long as the client reads, at the pace it reads.
      const zeros = new Uint8Array(64 * 1024);
      const more = () => {
        while (!res.destroyed && res.write(zeros)) { /* until the socket's buffer is full */ }
      };
      res.on("drain", more);
      heldOpen.add(res);
      more();
      return;
    }
    if (found === layer) {
      res.write(layer.data.subarray(0, stalledAfter));
      heldOpen.add(res); // the rest never comes
      return;
    }
    res.end(found.data);
  };

  const server = createServer(handle);
  server.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("The stand-in has no TCP address");
  const host = `127.0.0.1:${address.port}`;
  return {
    host,
    ref: (name) => `docker://${host}/${name}:latest`,
    manifestDigest,
    config,
    layer,
    stalledAfter,
    requests,
    held: () => heldOpen.size,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      heldOpen.clear();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

function notFound(res: ServerResponse, head: boolean): void {
  const body = JSON.stringify({ errors: [{ code: "NOT_FOUND", message: "not found" }] });
  res.writeHead(404, { "Content-Type": "application/json", "Content-Length": String(body.length) });
  res.end(head ? undefined : body);
}
