/**
 * The `image-proxy` command line (work in progress).
 *
 * @module
 */
export {};
