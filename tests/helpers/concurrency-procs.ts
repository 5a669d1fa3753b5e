/**
 * Counting the processes this one started, for the concurrency tests and the soak benchmark.
 */

import { execFileSync } from "node:child_process";

/**
 * The pids of this process's live children (zombies included: an unreaped child is a leak too).
 * `ps` itself is one of our children while it runs, so it is left out by name.
 */
export function childPids(): number[] {
  let out = "";
  try {
    out = execFileSync("ps", ["-o", "pid=,comm=", "--ppid", String(process.pid)], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    });
  } catch (err) {
    // ps exits 1 when nothing matched.
    if ((err as { status?: number }).status !== 1) throw err;
  }
  const pids: number[] = [];
  for (const line of out.split("\n")) {
    const match = /^\s*(\d+)\s+(.*)$/.exec(line);
    if (match && match[2].trim() !== "ps") pids.push(Number(match[1]));
  }
  return pids.sort((a, b) => a - b);
}
