#!/usr/bin/env bash
# The whole test suite: deno test, bun test and node --test on tests/ (both skopeo servers, a real
# registry), the CLI tests again against the `bun build --compile` single binary, a type check of the
# doc examples, and short runs of the benchmark and soak so they cannot rot. Installs what it needs
# first (.ci/setup is idempotent).
# Ends with one line: "N passed, N failed", summing every runner.
set -uo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup || { echo "0 passed, 1 failed"; exit 1; }
export PATH="$PWD/.tools/bin:$PATH"
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
extra=()

# What the library needs (ffi, run, env) plus what the tests do themselves: fixtures in the temp
# folder (read, write) and a registry stand-in on loopback (net).
DENO_PERMS=(--allow-ffi --allow-run --allow-env --allow-read --allow-write --allow-net=127.0.0.1,localhost)

echo "== deno test"
timeout 900 deno test "${DENO_PERMS[@]}" --junit-path="$reports/deno.xml" tests/

echo "== bun test"
timeout 900 bun test --timeout 120000 --reporter=junit --reporter-outfile="$reports/bun.xml" tests/

echo "== node test"
# Node runs the TypeScript files through the tsx loader (a devDependency, installed by .ci/setup);
# node 20 finds no .ts test file in a folder by itself, hence the glob.
timeout 900 node --import tsx --test --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=junit --test-reporter-destination="$reports/node.xml" tests/*_test.ts

echo "== the CLI tests against the bun build --compile binary"
rm -f dist/image-proxy-bun
if timeout 300 bun build --compile src/cli/main.ts --outfile dist/image-proxy-bun; then
  IMAGE_PROXY_BIN="$PWD/dist/image-proxy-bun" timeout 600 bun test --timeout 120000 --reporter=junit \
    --reporter-outfile="$reports/binary.xml" tests/cli_test.ts
else
  echo "bun build --compile failed"
fi

echo "== deno check --doc (the examples in the module docs and in README.md type-check)"
(timeout 300 deno check --doc mod.ts src/ && timeout 120 deno check --doc-only README.md)
extra+=("deno check --doc=$?")

echo "== bench/run.ts --quick (our client under Deno, Bun and Node)"
timeout 600 deno run --allow-read --allow-write --allow-run --allow-env --allow-ffi bench/run.ts --quick
extra+=("bench --quick=$?")

echo "== bench/soak.ts --quick (Deno, then Bun, then Node)"
timeout 300 deno run --allow-read --allow-write --allow-run --allow-env --allow-ffi --v8-flags=--expose-gc \
  bench/soak.ts --quick
extra+=("soak --quick under deno=$?")
timeout 300 bun bench/soak.ts --quick
extra+=("soak --quick under bun=$?")
timeout 300 node --expose-gc --import tsx bench/soak.ts --quick
extra+=("soak --quick under node=$?")

node scripts/junit-summary.mjs "$reports/deno.xml" "$reports/bun.xml" "$reports/node.xml" "$reports/binary.xml" \
  "${extra[@]/#/--check=}"
