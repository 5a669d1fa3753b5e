/**
 * Streaming XXH64, the checksum of zstd frames (their low 32 bits), for the decoder that does not
 * check it. 64-bit words are kept as two 32-bit halves: BigInt arithmetic is ten times slower.
 *
 * @module
 */

// The five primes, as [high, low] halves.
const P1H = 0x9e3779b1, P1L = 0x85ebca87;
const P2H = 0xc2b2ae3d, P2L = 0x27d4eb4f;
const P3H = 0x165667b1, P3L = 0x9e3779f9;
const P4H = 0x85ebca77, P4L = 0xc2b2ae63;
const P5H = 0x27d4eb2f, P5L = 0x165667c5;

// Results of the helpers below, to avoid an allocation per 64-bit operation.
let rh = 0, rl = 0;

/** (ah:al) * (bh:bl) mod 2^64 into rh:rl. */
function mul(ah: number, al: number, bh: number, bl: number): void {
  const a0 = al & 0xffff, a1 = al >>> 16, b0 = bl & 0xffff, b1 = bl >>> 16;
  const p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
  const high = p11 + (p01 >>> 16) + (p10 >>> 16) + (mid >>> 16);
  rl = Math.imul(al, bl) >>> 0;
  rh = (high + Math.imul(ah, bl) + Math.imul(al, bh)) >>> 0;
}

/** (ah:al) + (bh:bl) mod 2^64 into rh:rl. */
function add(ah: number, al: number, bh: number, bl: number): void {
  const low = al + bl;
  rl = low >>> 0;
  rh = (ah + bh + (low > 0xffffffff ? 1 : 0)) >>> 0;
}

/** (h:l) rotated left by `r` (0 < r < 32) into rh:rl. */
function rotl(h: number, l: number, r: number): void {
  rh = ((h << r) | (l >>> (32 - r))) >>> 0;
  rl = ((l << r) | (h >>> (32 - r))) >>> 0;
}

/** round(acc, lane) = rotl(acc + lane * P2, 31) * P1, into rh:rl. */
function round(acch: number, accl: number, laneh: number, lanel: number): void {
  mul(laneh, lanel, P2H, P2L);
  add(acch, accl, rh, rl);
  rotl(rh, rl, 31);
  mul(rh, rl, P1H, P1L);
}

/** XXH64 with seed 0 over data given in pieces. */
export class XxHash64 {
  // The four accumulators, as high and low halves.
  #v = new Uint32Array(8);
  #buffer = new Uint8Array(32);
  #buffered = 0;
  #total = 0;

  constructor() {
    add(P1H, P1L, P2H, P2L);
    this.#v.set([rh, rl, P2H, P2L, 0, 0]);
    add(0, 0, ~P1H >>> 0, ~P1L >>> 0); // -P1 = ~P1 + 1
    add(rh, rl, 0, 1);
    this.#v[6] = rh;
    this.#v[7] = rl;
  }

  #stripe(data: Uint8Array, offset: number): void {
    const v = this.#v;
    for (let lane = 0; lane < 4; lane++) {
      const o = offset + lane * 8;
      const lanel = (data[o] | (data[o + 1] << 8) | (data[o + 2] << 16) | (data[o + 3] << 24)) >>> 0;
      const laneh = (data[o + 4] | (data[o + 5] << 8) | (data[o + 6] << 16) | (data[o + 7] << 24)) >>> 0;
      round(v[lane * 2], v[lane * 2 + 1], laneh, lanel);
      v[lane * 2] = rh;
      v[lane * 2 + 1] = rl;
    }
  }

  /** Adds `data` to the hashed content. */
  update(data: Uint8Array): void {
    this.#total += data.length;
    let offset = 0;
    if (this.#buffered > 0) {
      const take = Math.min(32 - this.#buffered, data.length);
      this.#buffer.set(data.subarray(0, take), this.#buffered);
      this.#buffered += take;
      offset = take;
      if (this.#buffered < 32) return;
      this.#stripe(this.#buffer, 0);
      this.#buffered = 0;
    }
    for (; offset + 32 <= data.length; offset += 32) this.#stripe(data, offset);
    this.#buffer.set(data.subarray(offset), 0);
    this.#buffered = data.length - offset;
  }

  /** The low 32 bits of the digest, as zstd stores them. */
  digestLow32(): number {
    const v = this.#v;
    let h: number, l: number;
    if (this.#total >= 32) {
      rotl(v[0], v[1], 1);
      let sh = rh, sl = rl;
      rotl(v[2], v[3], 7);
      add(sh, sl, rh, rl);
      sh = rh, sl = rl;
      rotl(v[4], v[5], 12);
      add(sh, sl, rh, rl);
      sh = rh, sl = rl;
      rotl(v[6], v[7], 18);
      add(sh, sl, rh, rl);
      h = rh, l = rl;
      for (let lane = 0; lane < 4; lane++) {
        round(0, 0, v[lane * 2], v[lane * 2 + 1]);
        h = (h ^ rh) >>> 0, l = (l ^ rl) >>> 0;
        mul(h, l, P1H, P1L);
        add(rh, rl, P4H, P4L);
        h = rh, l = rl;
      }
    } else {
      h = P5H, l = P5L;
    }
    // The total length, as a 64-bit number.
    add(h, l, Math.floor(this.#total / 0x100000000) >>> 0, this.#total >>> 0);
    h = rh, l = rl;
    const data = this.#buffer;
    let o = 0;
    for (; o + 8 <= this.#buffered; o += 8) {
      const lanel = (data[o] | (data[o + 1] << 8) | (data[o + 2] << 16) | (data[o + 3] << 24)) >>> 0;
      const laneh = (data[o + 4] | (data[o + 5] << 8) | (data[o + 6] << 16) | (data[o + 7] << 24)) >>> 0;
      round(0, 0, laneh, lanel);
      h = (h ^ rh) >>> 0, l = (l ^ rl) >>> 0;
      rotl(h, l, 27);
      mul(rh, rl, P1H, P1L);
      add(rh, rl, P4H, P4L);
      h = rh, l = rl;
    }
    if (o + 4 <= this.#buffered) {
      const word = (data[o] | (data[o + 1] << 8) | (data[o + 2] << 16) | (data[o + 3] << 24)) >>> 0;
      mul(0, word, P1H, P1L);
      h = (h ^ rh) >>> 0, l = (l ^ rl) >>> 0;
      rotl(h, l, 23);
      mul(rh, rl, P2H, P2L);
      add(rh, rl, P3H, P3L);
      h = rh, l = rl;
      o += 4;
    }
    for (; o < this.#buffered; o++) {
      mul(0, data[o], P5H, P5L);
      h = (h ^ rh) >>> 0, l = (l ^ rl) >>> 0;
      rotl(h, l, 11);
      mul(rh, rl, P1H, P1L);
      h = rh, l = rl;
    }
    // Avalanche: h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32.
    l = (l ^ (h >>> 1)) >>> 0;
    mul(h, l, P2H, P2L);
    h = rh, l = rl;
    l = (l ^ ((l >>> 29) | (h << 3))) >>> 0;
    h = (h ^ (h >>> 29)) >>> 0;
    mul(h, l, P3H, P3L);
    h = rh, l = rl;
    l = (l ^ h) >>> 0;
    return l;
  }
}
