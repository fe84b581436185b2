#!/usr/bin/env bash
# Proves the harness: the Go stand-in (built on NRI's own pkg/stub) must pass
# every case, and each deliberately injected contract violation
# (STANDIN_FAULT, see stand-in/main.go) must make the case that guards it fail.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export GOTOOLCHAIN=local
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$here/stand-in" && go build -o "$tmp/stand-in" .)
export NRI_CONFORMANCE_PLUGIN="$tmp/stand-in"

bad=0
echo "### the stand-in must pass everything"
if "$here/run.sh" > "$tmp/positive.log" 2>&1; then
  echo "ok   stand-in passes v012 and v008"
else
  echo "FAIL stand-in does not pass (log below)"; tail -50 "$tmp/positive.log"; bad=1
fi

echo "### each fault must be caught"
# module  test  fault
while read -r module test fault; do
  if (cd "$here/$module" && STANDIN_FAULT="$fault" go test -count=1 -run "^${test}\$" . > "$tmp/neg.log" 2>&1); then
    echo "FAIL $module $test passed despite fault '$fault'"; bad=1
  elif grep -q -- "--- FAIL: $test" "$tmp/neg.log"; then
    echo "ok   $module $test catches '$fault': $(grep -E '^\s+\S+_test.go:[0-9]+: ' "$tmp/neg.log" | grep -v -E -- 'after launch|unsplit|chunk|took|----' | head -1 | sed 's/^\s*//' | cut -c1-150)"
  else
    echo "FAIL $module $test did not run properly with fault '$fault'"; tail -20 "$tmp/neg.log"; bad=1
  fi
done <<'CASES'
v008 TestRegisterConfigureSynchronize wide-mask
v012 TestCreateContainerAdjustment bad-adjust
v008 TestCreateContainerAdjustment slow-create
v012 TestStartContainerFailure no-refuse
v008 TestStartContainerFailure no-refuse
v012 TestEventDelivery unimplemented
v012 TestSplitSynchronize no-split
v008 TestSplitSynchronize no-split
v012 TestRuntimeRestart no-reconnect
v008 TestRuntimeRestart no-reconnect
v012 TestConcurrentCreate bad-adjust
CASES
exit "$bad"
