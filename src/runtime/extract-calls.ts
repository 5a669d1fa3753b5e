/**
 * The two calls an extraction needs that no runtime's `node:fs` offers in full: times to the
 * nanosecond on any entry, a symlink included (`utimensat` with `AT_SYMLINK_NOFOLLOW`; `node:fs` takes
 * a double, or milliseconds under Deno), and extended attributes (`lsetxattr`, absent from `node:fs`).
 * Each adapter binds the raw libc calls with its own FFI; this file packs their arguments and turns a
 * failure into an `Error` with `code`, `errno`, `syscall` and `path`, as `node:fs` errors have them.
 * It imports no runtime module and reads no runtime global.
 *
 * @module
 */

/** What an extraction calls when the runtime can (see {@linkcode extractCalls} in `detect.ts`). */
export interface ExtractCalls {
  /**
   * Sets the access and modification times of `path` to `ns` nanoseconds since the epoch, on the path
   * itself, never following a symlink.
   *
   * @throws {Error} with `code` (`"ENOENT"`, ...) when the call fails.
   */
  setTimes(path: string, ns: bigint): void;
  /**
   * Sets the extended attribute `name` of `path` to `value`, never following a symlink.
   *
   * @throws {Error} with `code` (`"EPERM"`, `"EOPNOTSUPP"`, ...) when the call fails.
   */
  setXattr(path: string, name: string, value: Uint8Array): void;
}

/** The libc calls under {@linkcode ExtractCalls}, as an adapter binds them (synchronous, this thread). */
export interface ExtractLibc {
  /** `utimensat(2)`; `path` ends with a NUL byte, `times` holds two `struct timespec`. */
  utimensat(dirfd: number, path: Uint8Array, times: Uint8Array, flags: number): number;
  /** `lsetxattr(2)`; `path` and `name` end with a NUL byte. */
  lsetxattr(path: Uint8Array, name: Uint8Array, value: Uint8Array, size: number, flags: number): number;
  /** The calling thread's `errno`, right after a failed call. */
  errno(): number;
  /** `strerror(3)`, as text. */
  strerror(errno: number): string;
}

const AT_FDCWD = -100;
const AT_SYMLINK_NOFOLLOW = 0x100;
const NS_PER_SECOND = 1_000_000_000n;

/** The errno names a caller may test (`isMissing`, unsupported attributes); others read `E<number>`. */
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  7: "E2BIG",
  13: "EACCES",
  20: "ENOTDIR",
  22: "EINVAL",
  28: "ENOSPC",
  30: "EROFS",
  34: "ERANGE",
  36: "ENAMETOOLONG",
  40: "ELOOP",
  95: "EOPNOTSUPP",
  122: "EDQUOT",
};

const encoder = new TextEncoder();

function cString(text: string): Uint8Array {
  return encoder.encode(`${text}\0`);
}

/**
 * Packs arguments for `libc` and reports its failures as `node:fs` does.
 *
 * @param libc the adapter's binding.
 * @returns the calls.
 */
export function extractCallsOver(libc: ExtractLibc): ExtractCalls {
  const times = new BigInt64Array(4);
  const timesBytes = new Uint8Array(times.buffer);
  // Some FFIs refuse an empty buffer: an empty value is passed as one byte with a size of 0.
  const empty = new Uint8Array(1);
  const fail = (syscall: string, path: string): Error => {
    const errno = libc.errno();
    const code = ERRNO_NAMES[errno] ?? `E${errno}`;
    return Object.assign(new Error(`${code}: ${libc.strerror(errno)}, ${syscall} "${path}"`), {
      code,
      errno: -errno,
      syscall,
      path,
    });
  };
  return {
    setTimes(path, ns) {
      const seconds = ns / NS_PER_SECOND;
      const nanoseconds = ns % NS_PER_SECOND;
      times[0] = times[2] = seconds;
      times[1] = times[3] = nanoseconds;
      if (libc.utimensat(AT_FDCWD, cString(path), timesBytes, AT_SYMLINK_NOFOLLOW) !== 0) {
        throw fail("utimensat", path);
      }
    },
    setXattr(path, name, value) {
      const data = value.length === 0 ? empty : value;
      if (libc.lsetxattr(cString(path), cString(name), data, value.length, 0) !== 0) {
        throw fail("lsetxattr", path);
      }
    },
  };
}
