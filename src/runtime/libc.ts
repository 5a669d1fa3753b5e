/**
 * The Linux libc structures and constants both adapters use for SCM_RIGHTS, as pure functions over
 * byte buffers: no FFI here, so the layouts are unit-tested on their own. x86_64 and aarch64 Linux
 * share these layouts (LP64).
 *
 * @module
 */

/** `AF_UNIX`. */
export const AF_UNIX = 1;
/** `SOCK_SEQPACKET`. */
export const SOCK_SEQPACKET = 5;
/** `SOCK_CLOEXEC`. */
export const SOCK_CLOEXEC = 0o2000000;
/** `SOL_SOCKET`. */
export const SOL_SOCKET = 1;
/** `SCM_RIGHTS`. */
export const SCM_RIGHTS = 1;
/** `MSG_CTRUNC`: ancillary data was cut (fds were lost). */
export const MSG_CTRUNC = 0x8;
/** `MSG_TRUNC`: the packet was larger than the buffer. */
export const MSG_TRUNC = 0x20;
/** `MSG_DONTWAIT`. */
export const MSG_DONTWAIT = 0x40;
/** `MSG_NOSIGNAL`: no SIGPIPE when the peer is gone. */
export const MSG_NOSIGNAL = 0x4000;
/** `MSG_CMSG_CLOEXEC`: received fds are close-on-exec from the start. */
export const MSG_CMSG_CLOEXEC = 0x40000000;
/** `SHUT_RDWR`. */
export const SHUT_RDWR = 2;
/** `F_GETFD`. */
export const F_GETFD = 1;
/** `F_SETFD`. */
export const F_SETFD = 2;
/** `F_GETFL`. */
export const F_GETFL = 3;
/** `F_SETFL`. */
export const F_SETFL = 4;
/** `FD_CLOEXEC`. */
export const FD_CLOEXEC = 1;
/** `O_NONBLOCK`. */
export const O_NONBLOCK = 0o4000;
/** `F_SETPIPE_SZ`. */
export const F_SETPIPE_SZ = 1031;
/** `F_GETPIPE_SZ`. */
export const F_GETPIPE_SZ = 1032;
/** `FIONREAD`: bytes waiting to be read. */
export const FIONREAD = 0x541b;
/** `O_CLOEXEC`. */
export const O_CLOEXEC = 0o2000000;
/** `O_WRONLY | O_CREAT | O_TRUNC`: open a file for writing, created or emptied. */
export const O_WRITE_NEW = 0o1 | 0o100 | 0o1000;
/** `SPLICE_F_MOVE`: a hint to move pages rather than copy them. */
export const SPLICE_F_MOVE = 1;
/** `SPLICE_F_NONBLOCK`: do not wait on the pipe. */
export const SPLICE_F_NONBLOCK = 2;
/** `MFD_CLOEXEC`. */
export const MFD_CLOEXEC = 1;
/** `EINTR`. */
export const EINTR = 4;
/** `EINVAL`. */
export const EINVAL = 22;
/** `EROFS`. */
export const EROFS = 30;
/** `EAGAIN`. */
export const EAGAIN = 11;
/** `POLLIN`. */
export const POLLIN = 0x1;

/** `sizeof(struct msghdr)`. */
export const MSGHDR_SIZE = 56;
/** `sizeof(struct iovec)`. */
export const IOVEC_SIZE = 16;
/** `sizeof(struct cmsghdr)`, the header before the fd array. */
export const CMSGHDR_SIZE = 16;
/** Offset of `msg_flags` in `struct msghdr`. */
export const MSGHDR_FLAGS_OFFSET = 48;

/** `CMSG_ALIGN`: rounds up to the size of a `size_t`. */
export function cmsgAlign(length: number): number {
  return (length + 7) & ~7;
}

/** `CMSG_SPACE(n * sizeof(int))`: the control buffer room for `n` fds. */
export function cmsgSpaceForFds(count: number): number {
  return CMSGHDR_SIZE + cmsgAlign(count * 4);
}

/**
 * Fills `struct iovec` and `struct msghdr` for a receive: one data buffer, one control buffer, no
 * address. Pointers are passed as bigints, as both runtimes' FFI return them.
 */
export function packMsghdr(
  msghdr: DataView,
  iovec: DataView,
  iovecAddress: bigint,
  data: { address: bigint; length: number },
  control: { address: bigint; length: number },
): void {
  iovec.setBigUint64(0, data.address, true);
  iovec.setBigUint64(8, BigInt(data.length), true);
  msghdr.setBigUint64(0, 0n, true); // msg_name
  msghdr.setUint32(8, 0, true); // msg_namelen
  msghdr.setUint32(12, 0, true);
  msghdr.setBigUint64(16, iovecAddress, true); // msg_iov
  msghdr.setBigUint64(24, 1n, true); // msg_iovlen
  msghdr.setBigUint64(32, control.address, true); // msg_control
  msghdr.setBigUint64(40, BigInt(control.length), true); // msg_controllen
  msghdr.setInt32(MSGHDR_FLAGS_OFFSET, 0, true); // msg_flags
  msghdr.setInt32(52, 0, true);
}

/** Resets the fields `recvmsg` writes back, so a reused `msghdr` is ready for the next call. */
export function resetMsghdr(msghdr: DataView, controlLength: number): void {
  msghdr.setBigUint64(40, BigInt(controlLength), true);
  msghdr.setInt32(MSGHDR_FLAGS_OFFSET, 0, true);
}

/** What `recvmsg` wrote back into a `msghdr`. */
export interface ReceivedHeader {
  /** `msg_flags` (look for `MSG_TRUNC`, `MSG_CTRUNC`). */
  flags: number;
  /** `msg_controllen`: how much of the control buffer holds messages. */
  controlLength: number;
}

/** Reads the fields `recvmsg` updates. */
export function readMsghdr(msghdr: DataView): ReceivedHeader {
  return {
    flags: msghdr.getInt32(MSGHDR_FLAGS_OFFSET, true),
    controlLength: Number(msghdr.getBigUint64(40, true)),
  };
}

/**
 * Walks the control messages (`CMSG_FIRSTHDR`/`CMSG_NXTHDR`) and returns every fd from SCM_RIGHTS
 * messages. Malformed lengths stop the walk; other message types are skipped.
 */
export function parseScmRights(control: Uint8Array, controlLength: number): number[] {
  const view = new DataView(control.buffer, control.byteOffset, Math.min(controlLength, control.byteLength));
  const fds: number[] = [];
  let offset = 0;
  while (offset + CMSGHDR_SIZE <= view.byteLength) {
    const length = Number(view.getBigUint64(offset, true));
    if (length < CMSGHDR_SIZE || offset + length > view.byteLength) break;
    const level = view.getInt32(offset + 8, true);
    const type = view.getInt32(offset + 12, true);
    if (level === SOL_SOCKET && type === SCM_RIGHTS) {
      for (let p = offset + CMSGHDR_SIZE; p + 4 <= offset + length; p += 4) fds.push(view.getInt32(p, true));
    }
    offset += cmsgAlign(length);
  }
  return fds;
}

/** Writes one SCM_RIGHTS message carrying `fds` (for tests and fake peers); returns its length. */
export function packScmRights(control: Uint8Array, fds: number[]): number {
  const view = new DataView(control.buffer, control.byteOffset, control.byteLength);
  const length = CMSGHDR_SIZE + fds.length * 4;
  view.setBigUint64(0, BigInt(length), true);
  view.setInt32(8, SOL_SOCKET, true);
  view.setInt32(12, SCM_RIGHTS, true);
  fds.forEach((fd, i) => view.setInt32(CMSGHDR_SIZE + i * 4, fd, true));
  return cmsgSpaceForFds(fds.length);
}
