// deno-lint-ignore-file no-console
// Sums JUnit reports from several runners into one line: "N passed, N failed".
// A missing or empty report counts as a failure: a runner that ran no test must not look green.
import { readFileSync } from "node:fs";

let passed = 0;
let failed = 0;
for (const path of process.argv.slice(2)) {
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
