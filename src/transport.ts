/**
 * The seam between the runtime-agnostic core and a runtime adapter. The core only ever talks to a
 * {@linkcode Transport}; an adapter owns the socketpair, the child process, SCM_RIGHTS and pipe reads.
 *
 * @module
 */

import type { ExitStatus } from "./errors.ts";

/** One reply packet and the file descriptors that came with it, already CLOEXEC. */
export interface ReceivedPacket {
  /** The packet's bytes (one JSON document). */
  data: Uint8Array;
  /** Received file descriptors; the receiver owns them and must close every one. */
  fds: number[];
}

/** How the child ended, with the tail of what it wrote to stderr. */
export interface ChildExit extends ExitStatus {
  /** The last few KiB of the child's stderr (empty when stderr was passed through). */
  stderrTail: string;
  /** True when `Transport.close` had to kill the child after its grace period. */
  killed: boolean;
}

/** An incremental hash, as `node:crypto`'s `Hash` or a pure JavaScript one provides. */
export interface Hasher {
  /** Feeds bytes. */
  update(data: Uint8Array): void;
  /** Returns the lowercase hex digest; the hasher is done afterwards. */
  hexDigest(): string;
}

/** Options for reading a received pipe as a stream. */
export interface FdStreamOptions {
  /** Grow the pipe to this many bytes (`F_SETPIPE_SZ`) before reading; best effort. */
  pipeSize?: number;
  /**
   * The reader does heavy work on every chunk on the JavaScript thread (the core hashing a raw blob),
   * so it is the slower side: read in large pieces, away from that thread, if the adapter can.
   */
  readerBusy?: boolean;
}

/**
 * A pipe whose bytes go into a file without passing through JavaScript (`splice(2)`): one copy in the
 * kernel instead of a read into a buffer and a write out of it.
 */
export interface FileSink {
  /**
   * Moves at most `max` bytes (at least 1) from the pipe to the end of the file. Resolves with how
   * many moved, 0 at the pipe's end of file; rejects with the system's reason (a full disk, say).
   */
  move(max: number): Promise<number>;
  /** Closes the pipe; a pending `move` closes it when it returns. Idempotent. */
  closePipe(): void;
  /**
   * Closes the file. With `flush`, first waits for a pending `move` and flushes the file to stable
   * storage (`fsync`), rejecting when that fails (the file is closed all the same); without, a pending
   * `move` (which may wait on a stalled pipe) closes it when it returns. Idempotent.
   */
  closeFile(flush: boolean): Promise<void>;
}

/**
 * A live connection to one proxy process.
 *
 * Requests are never concurrent: the core sends the next one only after the previous reply arrived.
 */
export interface Transport {
  /**
   * Sends one request packet and resolves with the one reply packet and its fds. A reply carrying an
   * fd that is not a pipe (the proxy sends nothing else) rejects with a `ProtocolError`, every fd closed.
   */
  request(packet: Uint8Array): Promise<ReceivedPacket>;
  /**
   * Optional fast path of {@linkcode Transport.request}: sends `packet` and returns the reply itself
   * when it arrives within a short wait on this thread, or else a promise of it, as `request` does.
   * Throws when the packet cannot be sent. A native `Promise` tells the two apart.
   */
  requestNow?(packet: Uint8Array): ReceivedPacket | Promise<ReceivedPacket>;
  /** Sends one packet that gets no reply (`Shutdown`). */
  send(packet: Uint8Array): Promise<void>;
  /**
   * Takes ownership of `fd` and returns its contents as a byte stream. The fd is closed when the
   * stream reaches end of file, errors, or is cancelled.
   */
  openStream(fd: number, options?: FdStreamOptions): ReadableStream<Uint8Array>;
  /**
   * Optional: takes ownership of pipe `fd` and opens `path` for writing (created, or truncated; mode
   * 0644), to move the pipe's bytes into it with {@linkcode FileSink.move}. Throws, with the system's
   * reason, when the file cannot be opened; `fd` then stays the caller's.
   */
  openFileSink?(fd: number, path: string, options?: FdStreamOptions): FileSink;
  /** Closes a received fd the core does not want. */
  closeFd(fd: number): void;
  /**
   * How full a pipe we read from is: the bytes waiting in it and its capacity. A full pipe means its
   * writer is blocked writing, so it ends at once with EPIPE when we close our end.
   */
  pipeFill?(fd: number): { queued: number; capacity: number } | undefined;
  /** Settles once the child has exited, with its status and stderr tail. Never rejects. */
  readonly exited: Promise<ChildExit>;
  /** The child's process id, when there is one. */
  readonly pid?: number;
  /** Closes the socket; the child then sees end of file and exits. Kills it after `graceMs`. */
  close(graceMs?: number): Promise<ChildExit>;
  /** An incremental hash for `algorithm` ("sha256" or "sha512"), when the runtime has a fast one. */
  createHasher?(algorithm: string): Hasher | undefined;
}

/** What a {@linkcode TransportFactory} needs to start one proxy. */
export interface SpawnRequest {
  /**
   * Builds the full command line once the adapter knows the fd numbers the child inherits:
   * `sockfd` is the child's end of the socketpair, `authfd` the memfd holding auth data, if any.
   */
  argv(fds: { sockfd: number; authfd?: number }): string[];
  /** Extra environment for the child, on top of ours. */
  env: Record<string, string>;
  /** auth.json content to hand over as an inherited memfd. */
  authData?: Uint8Array;
  /** Pass skopeo's stderr through instead of capturing its tail. */
  debug: boolean;
}

/** Starts proxies: one per runtime, or a scripted one in tests. */
export interface TransportFactory {
  /** Spawns the child and connects to it. Rejects with `SpawnError` when the command cannot start. */
  spawn(request: SpawnRequest): Promise<Transport>;
  /** Reads an environment variable (the core reads no runtime global itself). */
  env?(name: string): string | undefined;
}
