#!/usr/bin/env bash
# Builds Prometheus (github.com/prometheus/prometheus/cmd/prometheus, Go module v0.316.0 =
# Prometheus 3.16.0) from the Go module proxy into a versioned cache outside the repo. The scaler's
# Prometheus source is tested against it (tests/integration/test_scaler_prometheus.py): a real
# server scraping simulated engines, read through its HTTP API. No web UI assets are built (the API
# does not need them). A warm cache builds nothing. The wrapper module hack/modules/prometheus
# (go.mod + go.sum committed) pins every dependency. Env overrides: PDORCH_PROMETHEUS_CACHE (root),
# PROMETHEUS (module version). Prints the output directory on its last line.
set -euo pipefail
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
PROMETHEUS=${PROMETHEUS:-0.316.0}
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=${PDORCH_PROMETHEUS_CACHE:-${PDORCH_CACHE:-$HOME/.cache/pdorch}/prometheus}
OUT=$ROOT/prometheus$PROMETHEUS
if [ -f "$OUT/.complete" ] && [ -x "$OUT/prometheus" ]; then
  echo "cached: $OUT"; echo "$OUT"; exit 0
fi
# A warm cache needs no Go, so this is checked only here.
if ! command -v go >/dev/null 2>&1; then
  echo "build-prometheus: 'go' not found on PATH; install Go 1.26 (https://go.dev/dl/) and put it on PATH, then retry" >&2
  exit 127
fi
T0=$(date +%s)
step() { echo "[build-prometheus +$(( $(date +%s) - T0 ))s] $*" >&2; }
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
W=$ROOT/src/prometheus  # the wrapper module is built from a scratch copy outside the git tree
rm -rf "$W"; mkdir -p "$W"
cd "$W"
step "prometheus v$PROMETHEUS: resolving"
if [ -f "$HACK/modules/prometheus/go.sum" ]; then
  cp "$HACK/modules/prometheus"/go.* "$W/"
else
  go mod init local/pdorch-prometheus >/dev/null 2>&1
  go get -tool "github.com/prometheus/prometheus/cmd/prometheus@v$PROMETHEUS"
fi
step "prometheus v$PROMETHEUS: compiling (a few minutes on a cold Go cache)"
go build -trimpath -ldflags="-s -w" -o "$OUT.tmp/prometheus" github.com/prometheus/prometheus/cmd/prometheus
mkdir -p "$OUT.tmp/modules/prometheus"; cp go.mod go.sum "$OUT.tmp/modules/prometheus/"
printf 'prometheus_module=%s\nbuild_seconds=%s\n' "$PROMETHEUS" "$(( $(date +%s) - T0 ))" > "$OUT.tmp/versions.txt"
touch "$OUT.tmp/.complete"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
step "done: $OUT"
echo "$OUT"
