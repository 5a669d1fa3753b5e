/**
 * The few Bun APIs the Bun adapter touches, declared locally so that Deno can type-check the adapter
 * without Bun's type package, and so that nothing here adds globals to a user's type environment.
 * Types only: this module has no runtime code.
 *
 * @module
 */

/** A `bun:ffi` symbol specification. */
export interface FfiSymbol {
  /** Argument types (`"i32"`, `"ptr"`, `"usize"`, ...). */
  args: readonly string[];
  /** Return type. */
  returns: string;
}

/** What the adapter uses of `bun:ffi`. */
export interface BunFfi {
  /** Opens a shared library and binds `symbols`. */
  dlopen(
    path: string,
    symbols: Record<string, FfiSymbol>,
  ): { symbols: Record<string, (...args: unknown[]) => unknown>; close(): void };
  /** The address of a typed array's first byte (plus `byteOffset`). */
  ptr(view: ArrayBufferView | ArrayBufferLike, byteOffset?: number): number;
  /** Reads native memory. */
  read: { i32(address: number, offset: number): number };
  /** A NUL-terminated C string at `address`, as a JavaScript string. */
  CString: new (address: number) => { toString(): string };
}

/** A child started by `Bun.spawn`. */
export interface BunSubprocess {
  /** The child's process id. */
  readonly pid: number;
  /** Resolves with the exit code once the child has exited (or been reaped after a signal). */
  readonly exited: Promise<number>;
  /** The exit code, or `null` when a signal ended the child or it still runs. */
  readonly exitCode: number | null;
  /** The signal that ended the child (`"SIGKILL"`), or `null`. */
  readonly signalCode: string | null;
  /** The child's stderr when it was `"pipe"`d. */
  readonly stderr: ReadableStream<Uint8Array> | number | undefined | null;
  /** Sends a signal. */
  kill(signal?: string | number): void;
  /** Lets the child keep the event loop alive again. */
  ref(): void;
  /** Stops the child from keeping the event loop alive. */
  unref(): void;
}

/** What the adapter passes to `Bun.spawn`. */
export interface BunSpawnOptions {
  /** `[stdin, stdout, stderr, ...inherited fds]`; a number at index N becomes fd N in the child. */
  stdio: (string | number | null)[];
  /** The child's whole environment. */
  env: Record<string, string | undefined>;
}

/** An incremental hash (`Bun.CryptoHasher`). */
export interface BunCryptoHasher {
  /** Feeds bytes. */
  update(data: Uint8Array): unknown;
  /** Finishes and returns the digest as lowercase hex. */
  digest(encoding: "hex"): string;
}

/** What the adapter uses of the `Bun` global. */
export interface BunGlobal {
  /** Starts a child process; throws when the command cannot be started. */
  spawn(command: string[], options: BunSpawnOptions): BunSubprocess;
  /** A lazily read file, here always a pipe given by fd. */
  file(fd: number): { stream(): ReadableStream<Uint8Array> };
  /** Native incremental hashes. */
  CryptoHasher: new (algorithm: string) => BunCryptoHasher;
  /** The process environment. */
  env: Record<string, string | undefined>;
}

/** Bun's `Worker`, which can stop keeping the event loop alive. */
export interface BunWorker extends Worker {
  /** Lets the program exit while the worker still runs. */
  unref(): void;
  /** Keeps the program alive while the worker runs. */
  ref(): void;
}
