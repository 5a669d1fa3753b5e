// deno-lint-ignore-file no-console
// Sums JUnit reports from several runners into one line: "N passed, N failed".
// A missing or empty report counts as a failure: a runner that ran no test must not look green; so
// does one cut short (no closing </testsuites>: the runner was killed).
// Deno and Bun nest every <testcase> in a <testsuite> per file; node --test puts top-level tests
// straight under <testsuites> and turns a describe() or a test with subtests into a <testsuite>.
// Either way each <testcase> is one test, and testcases never nest. A skipped (or todo) test holds a
// <skipped> element and counts neither way; a failed or cancelled one holds a <failure> or <error>.
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
  // Quoted attribute values may hold a ">" (node escapes only "<" and "&" there).
  const cases = xml.match(/<testcase\b(?:[^>"]|"[^"]*")*?(\/>|>[\s\S]*?<\/testcase>)/g) ?? [];
  if (cases.length === 0) {
    console.error(`${path}: no test ran`);
    failed++;
    continue;
  }
  if (!/<\/testsuites>\s*$/.test(xml)) {
    console.error(`${path}: the report was cut short`);
    failed++;
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
