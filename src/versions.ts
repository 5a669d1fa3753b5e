/**
 * Which skopeo release speaks which protocol version: the one table every message that names a
 * version reads, so that an error, a hint and the documentation cannot disagree.
 *
 * @module
 */

/** The oldest protocol version this library speaks (skopeo 1.9). */
export const BASE_PROTOCOL_VERSION = "0.2.3";

/**
 * From this protocol version on, the proxy enforces signature policy at OpenImage; older proxies
 * serve images their policy would reject.
 */
export const POLICY_VERSION = "0.2.6";

/** The first skopeo release whose proxy speaks at least each protocol version. */
export const FIRST_SKOPEO_RELEASE: Readonly<Record<string, string>> = {
  "0.2.3": "1.9",
  "0.2.4": "1.11",
  "0.2.5": "1.11",
  "0.2.6": "1.13",
  "0.2.7": "1.19",
  "0.2.8": "1.19",
};

/**
 * How a message names the skopeo that has `version`: `"skopeo 1.19 or newer"`, or `undefined` for a
 * version no release is known to speak.
 *
 * @param version A protocol version (`"0.2.8"`).
 * @returns The phrase, or `undefined`.
 */
export function skopeoForVersion(version: string): string | undefined {
  const release = FIRST_SKOPEO_RELEASE[version];
  return release === undefined ? undefined : `skopeo ${release} or newer`;
}
