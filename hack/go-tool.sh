# Shared by hack/build-helm.sh and hack/build-prometheus.sh (sourced, not run): build one Go command
# from a wrapper module (hack/modules/<name>: go.mod + go.sum pinning every dependency) into a
# versioned cache directory outside the repo. A warm cache builds nothing.
#
#   go_tool_begin NAME VERSION ROOT MAIN_PACKAGE
#       ROOT/NAME$VERSION already complete: print it and exit 0. Otherwise check for Go, set OUT
#       (the output directory, built as $OUT.tmp), and cd into a scratch copy of the wrapper module
#       (resolved from MAIN_PACKAGE@vVERSION when hack/modules/NAME has none yet).
#   go_tool_end NAME VERSION
#       record the module files and versions, mark the output complete and print its path.
# The caller builds "$OUT.tmp/NAME" in between; `step` prints progress to stderr.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
GO_TOOL_HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$(date +%s)

go_tool_begin() {
  local name=$1 version=$2 root=$3 main=$4
  OUT=$root/$name$version
  if [ -f "$OUT/.complete" ] && [ -x "$OUT/$name" ]; then
    echo "cached: $OUT"; echo "$OUT"; exit 0
  fi
  # Checked only now: a warm cache needs no Go. Without this the first `go` call fails mid-script.
  if ! command -v go >/dev/null 2>&1; then
    echo "build-$name: 'go' not found on PATH; install Go 1.26 (https://go.dev/dl/) and put it on PATH, then retry" >&2
    exit 127
  fi
  STEP_NAME=$name
  rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
  # The wrapper module is built from a scratch copy outside the git tree (no VCS stamping surprises).
  local w=$root/src/$name
  rm -rf "$w"; mkdir -p "$w"
  cd "$w"
  step "$name v$version: resolving"
  if [ -f "$GO_TOOL_HACK/modules/$name/go.sum" ]; then
    cp "$GO_TOOL_HACK/modules/$name"/go.* "$w/"
  else
    go mod init "local/pdorch-$name" >/dev/null 2>&1
    go get -tool "$main@v$version"
  fi
}

go_tool_end() {
  local name=$1 version=$2
  mkdir -p "$OUT.tmp/modules/$name"; cp go.mod go.sum "$OUT.tmp/modules/$name/"
  printf '%s=%s\nbuild_seconds=%s\n' "$name" "$version" "$(( $(date +%s) - T0 ))" > "$OUT.tmp/versions.txt"
  touch "$OUT.tmp/.complete"
  rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
  step "done: $OUT"
  echo "$OUT"
}

step() { echo "[build-${STEP_NAME:-tool} +$(( $(date +%s) - T0 ))s] $*" >&2; }
