#!/usr/bin/env bash
# The whole test suite, under Deno and then Bun, against both real skopeo servers. Installs what it
# needs first (.ci/setup is idempotent). Ends with one line: "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup || { echo "0 passed, 1 failed"; exit 1; }
export PATH="$PWD/.tools/bin:$PATH"
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT

# Exactly the permissions the library needs, plus read/write for fixtures in the temp folder.
DENO_PERMS=(--allow-ffi --allow-run --allow-env --allow-read --allow-write --allow-net=127.0.0.1,localhost)

echo "== deno test"
timeout 900 deno test "${DENO_PERMS[@]}" --junit-path="$reports/deno.xml" tests/
deno_rc=$?
echo "== bun test"
timeout 900 bun test --timeout 120000 --reporter=junit --reporter-outfile="$reports/bun.xml" tests/
bun_rc=$?
node scripts/junit-summary.mjs "$reports/deno.xml" "$reports/bun.xml"
summary_rc=$?
[ $deno_rc -eq 0 ] && [ $bun_rc -eq 0 ] && [ $summary_rc -eq 0 ]
