#!/usr/bin/env bash
# Builds Prometheus (github.com/prometheus/prometheus/cmd/prometheus, Go module v0.316.0 =
# Prometheus 3.16.0) from the Go module proxy into a versioned cache outside the repo. The scaler's
# Prometheus source is tested against it (tests/compat/test_scaler_prometheus.py): a real
# server scraping simulated engines, read through its HTTP API. No web UI assets are built (the API
# does not need them). A warm cache builds nothing. The wrapper module hack/modules/prometheus
# (go.mod + go.sum committed) pins every dependency. Env overrides: PDORCH_PROMETHEUS_CACHE (root),
# PROMETHEUS (module version). Prints the output directory on its last line.
set -euo pipefail
PROMETHEUS=${PROMETHEUS:-0.316.0}
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-tool.sh
source "$HACK/go-tool.sh"
go_tool_begin prometheus "$PROMETHEUS" "${PDORCH_PROMETHEUS_CACHE:-${PDORCH_CACHE:-$HOME/.cache/pdorch}/prometheus}" \
  github.com/prometheus/prometheus/cmd/prometheus
step "prometheus v$PROMETHEUS: compiling (a few minutes on a cold Go cache)"
# Prometheus's own version (module v0.MMP.P is Prometheus M.MP.P: 0.316.0 is 3.16.0), stamped as its
# release builds do, so `prometheus --version` says which one runs.
MMM=${PROMETHEUS#0.}; MMM=${MMM%%.*}
VERSION="$((MMM / 100)).$((MMM % 100)).${PROMETHEUS##*.}"
go build -trimpath -ldflags="-s -w -X github.com/prometheus/common/version.Version=$VERSION -X github.com/prometheus/common/version.Revision=v$PROMETHEUS" \
  -o "$OUT.tmp/prometheus" github.com/prometheus/prometheus/cmd/prometheus
go_tool_end prometheus "$PROMETHEUS"
