/**
 * A one-line progress display for standard error: redrawn in place at most ten times a second,
 * overwritten rather than erased first (no flicker), cut to the terminal's width so it never wraps,
 * and cleared before anything else is written.
 *
 * @module
 */

import { escapeControls } from "./io.ts";

/** What the line shows. */
export interface ProgressState {
  /** What is happening ("fetching", "extracting"). */
  action: string;
  /** The layer being read, from 1, with the number of layers. */
  layer?: number;
  /** The number of layers. */
  layers?: number;
  /** Bytes so far. */
  bytes: number;
  /** Bytes expected in total, when known. */
  totalBytes?: number;
}

/** Where a {@linkcode ProgressLine} draws, and its clock. */
export interface ProgressTarget {
  /** Writes to the terminal (standard error). */
  write(text: string): void;
  /** The terminal's width in columns. */
  columns(): number;
  /** Milliseconds, monotonic. */
  now(): number;
}

/** Formats a byte count with binary units: `512 B`, `1.5 KiB`, `12.3 MiB`. */
export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

/** The progress line; inert when disabled (stderr is not a terminal, or `--quiet`). */
export class ProgressLine {
  readonly #target: ProgressTarget;
  readonly #enabled: boolean;
  readonly #intervalMs: number;
  #start: number | undefined;
  #lastDraw = -Infinity;
  #shown = "";
  #pending: ProgressState | undefined;

  /**
   * @param target where to draw.
   * @param enabled whether to draw at all.
   * @param intervalMs the shortest time between two redraws.
   */
  constructor(target: ProgressTarget, enabled: boolean, intervalMs = 100) {
    this.#target = target;
    this.#enabled = enabled;
    this.#intervalMs = intervalMs;
  }

  /** Whether anything is drawn. */
  get enabled(): boolean {
    return this.#enabled;
  }

  /** Records the new state; redraws only when the last redraw is at least the interval old. */
  update(state: ProgressState): void {
    if (!this.#enabled) return;
    const now = this.#target.now();
    this.#start ??= now;
    this.#pending = state;
    if (now - this.#lastDraw < this.#intervalMs) return;
    this.#draw(now);
  }

  /** Removes the line, leaving the cursor at the start of an empty line. */
  clear(): void {
    if (!this.#enabled || this.#shown === "") return;
    this.#target.write("\r\x1b[K");
    this.#shown = "";
    this.#lastDraw = -Infinity;
  }

  /** The text for `state` at time `now`. */
  render(state: ProgressState, now: number): string {
    const parts = [state.action];
    if (state.layer !== undefined && state.layers !== undefined) {
      parts.push(`layer ${state.layer} of ${state.layers}`);
    }
    parts.push(
      state.totalBytes !== undefined && state.totalBytes > 0
        ? `${formatBytes(state.bytes)} / ${formatBytes(state.totalBytes)}`
        : formatBytes(state.bytes),
    );
    const seconds = (now - (this.#start ?? now)) / 1000;
    if (seconds >= 0.2) parts.push(`${formatBytes(state.bytes / seconds)}/s`);
    return parts.join("  ");
  }

  #draw(now: number): void {
    if (!this.#pending) return;
    const width = Math.max(10, this.#target.columns() - 1);
    // Escaped like every other line on stderr: the only control sequences drawn are the line's own.
    let text = escapeControls(this.render(this.#pending, now));
    if (text.length > width) text = text.slice(0, width);
    this.#lastDraw = now;
    if (text === this.#shown) return;
    // Overwrite, then erase what is left of a longer previous line: no blank frame in between.
    this.#target.write(`\r${text}\x1b[K`);
    this.#shown = text;
  }
}
