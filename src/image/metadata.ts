/**
 * The last steps of each extracted entry: its extended attributes and its times, through the
 * runtime's {@linkcode ExtractCalls} when it has them (times to the nanosecond, a symlink's own
 * included, and `lsetxattr`), else through `node:fs` (times to the millisecond, no attributes).
 *
 * Order matters, and the caller keeps it: owner, then mode, then attributes, then times. Changing the
 * owner clears setuid, setgid and `security.capability`; setting an attribute changes the ctime only.
 *
 * Which attributes are written: `user.*` and `security.capability` always (an unprivileged user may
 * set a capability on a file of its own only in a user namespace that allows it; refused, it is
 * skipped); `trusted.*` and the rest of `security.*` (SELinux labels, IMA) only as root, as GNU tar
 * does; `system.*` (ACLs, which need their own encoding and checks) and unknown namespaces never.
 * One the file system refuses is skipped and counted, as GNU tar warns and goes on.
 *
 * @module
 */

import { lutimes, utimes } from "node:fs/promises";
import { type ExtractCalls, extractCalls } from "../runtime/detect.ts";
import type { TarHeader } from "./tar.ts";

/** What the metadata steps did, added to a layer's stats. */
export interface MetadataCounts {
  /** Extended attributes written. */
  xattrs: number;
  /** Extended attributes not written: not allowed (namespace, not root) or refused by the file system. */
  xattrsSkipped: number;
}

/**
 * Whether an extended attribute is written, by its name.
 *
 * @param name the attribute's full name (`user.mime_type`, `security.capability`).
 * @param asRoot whether the extraction runs as root.
 */
export function xattrAllowed(name: string, asRoot: boolean): boolean {
  if (name.startsWith("user.") || name === "security.capability") return true;
  return asRoot && (name.startsWith("trusted.") || name.startsWith("security."));
}

/** The errors of a refused attribute: a namespace or a file type the file system does not take. */
const XATTR_REFUSALS = new Set(["EPERM", "EACCES", "EOPNOTSUPP", "E2BIG", "ENOSPC", "ERANGE"]);

/** Sets times and attributes of extracted entries. */
export class EntryMetadata {
  readonly #calls: ExtractCalls | undefined;
  readonly #xattrs: boolean;
  readonly #asRoot: boolean;

  private constructor(calls: ExtractCalls | undefined, xattrs: boolean, asRoot: boolean) {
    this.#calls = calls;
    this.#xattrs = xattrs;
    this.#asRoot = asRoot;
  }

  /**
   * Binds the runtime's calls (once per process).
   *
   * @param options `xattrs`: write extended attributes; `asRoot`: the extraction runs as root.
   */
  static async open(options: { xattrs: boolean; asRoot: boolean }): Promise<EntryMetadata> {
    return new EntryMetadata(await extractCalls(), options.xattrs, options.asRoot);
  }

  /**
   * Writes the entry's extended attributes to `path` (never through a symlink).
   *
   * @param counts where written and skipped attributes are counted.
   */
  xattrs(path: string, header: TarHeader, counts: MetadataCounts): void {
    if (header.xattrs === undefined) return;
    for (const [name, value] of header.xattrs) {
      if (!this.#xattrs || this.#calls === undefined || !xattrAllowed(name, this.#asRoot)) {
        counts.xattrsSkipped++;
        continue;
      }
      try {
        this.#calls.setXattr(path, name, value);
        counts.xattrs++;
      } catch (err) {
        if (!XATTR_REFUSALS.has((err as { code?: string }).code ?? "")) throw err;
        counts.xattrsSkipped++;
      }
    }
  }

  /**
   * Sets the access and modification times of `path` itself (a symlink's own) to the entry's time.
   *
   * @param symlink whether `path` is a symlink, whose time `node:fs` sets with `lutimes`.
   */
  async times(path: string, time: { mtime: number; mtimeNs?: bigint }, symlink = false): Promise<void> {
    const seconds = Number.isFinite(time.mtime) ? time.mtime : 0;
    if (this.#calls !== undefined) {
      return this.#calls.setTimes(path, time.mtimeNs ?? BigInt(Math.round(seconds * 1e9)));
    }
    await (symlink ? lutimes : utimes)(path, seconds, seconds);
  }
}
