// deno-lint-ignore-file no-console
// Sums JUnit reports from several runners into one line: "N passed, N failed".
// A missing or empty report counts as a failure: a runner that ran no test must not look green.
// `--check=NAME=STATUS` adds one more result: a command that passed when its exit status was 0.
import { readFileSync } from "node:fs";

let passed = 0;
let failed = 0;
const checks = process.argv.slice(2).filter((a) => a.startsWith("--check="));
for (const check of checks) {
  const [, name, status] = /^--check=(.*)=(\d+)$/.exec(check) ?? [, check, "1"];
  if (status === "0") passed++;
  else failed++;
  console.error(`${name}: ${status === "0" ? "passed" : `failed (exit status ${status})`}`);
}
for (const path of process.argv.slice(2).filter((a) => !a.startsWith("--check="))) {
  let xml = "";
  try {
    xml = readFileSync(path, "utf8");
  } catch {
    console.error(`${path}: no report`);
  }
  const cases = xml.match(/<testcase\b[^>]*?(\/>|>[\s\S]*?<\/testcase>)/g) ?? [];
  if (cases.length === 0) {
    console.error(`${path}: no test ran`);
    failed++;
    continue;
  }
  let runnerFailed = 0;
  for (const c of cases) {
    if (/<(failure|error)\b/.test(c)) runnerFailed++;
    else if (!/<skipped\b/.test(c)) passed++;
  }
  failed += runnerFailed;
  console.error(`${path}: ${cases.length} tests, ${runnerFailed} failed`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
