#!/usr/bin/env bash
# Builds the real control-plane binaries pdorch's dev cluster runs, from the Go module proxy at
# pinned versions, into a versioned cache outside the repo. A warm cache builds nothing.
#
#   etcd                      go.etcd.io/etcd/server/v3        (wrapper: server/v3 has replace directives)
#   kube-apiserver, -controller-manager, -scheduler  k8s.io/kubernetes  (wrapper: staging modules replaced
#                             by their published twins, list generated from the real go.mod)
#   kwok + stage files        sigs.k8s.io/kwok/cmd/kwok
#   lws-manager + CRDs        sigs.k8s.io/lws/cmd
#
# Each program has its own wrapper module under hack/modules/ (go.mod + go.sum committed), so Go's
# version selection never raises what Kubernetes pinned. Env overrides: PDORCH_KUBE_CACHE (root),
# K8S, ETCD, LWS, KWOK (versions). Prints the output directory on its last line.
set -euo pipefail
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
K8S=${K8S:-1.34.4}
ETCD=${ETCD:-3.6.16}
LWS=${LWS:-0.9.0}
KWOK=${KWOK:-0.8.0}
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=${PDORCH_KUBE_CACHE:-${PDORCH_CACHE:-$HOME/.cache/pdorch}/kube}
OUT=$ROOT/k8s$K8S-etcd$ETCD-lws$LWS-kwok$KWOK
if [ -f "$OUT/.complete" ]; then
  echo "cached: $OUT"; echo "$OUT"; exit 0
fi
# Checked only now: a warm cache needs no Go. Without this the first `go` call fails mid-script.
if ! command -v go >/dev/null 2>&1; then
  echo "build-kube: 'go' not found on PATH; install Go 1.26 (https://go.dev/dl/) and put it on PATH, then retry" >&2
  exit 127
fi
T0=$(date +%s)
step() { echo "[build-kube +$(( $(date +%s) - T0 ))s] $*" >&2; }
# PDORCH_BUILD_MEASURE=1: report Go module/build cache sizes after each component (for docs).
measure() {
  [ -n "${PDORCH_BUILD_MEASURE:-}" ] || return 0
  step "disk after $1: modcache $(du -sh "$(go env GOMODCACHE)" 2>/dev/null | cut -f1), buildcache $(du -sh "$(go env GOCACHE)" 2>/dev/null | cut -f1), binaries $(du -sh "$OUT.tmp" | cut -f1)"
}
jsonfield() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp" "$ROOT/src"

# prepare_module NAME: copies the committed wrapper module to a scratch dir outside the git tree
# (no VCS stamping surprises) and cds into it; returns 0 if go.sum was committed (resolved already).
prepare_module() {
  local name=$1 w=$ROOT/src/$1
  rm -rf "$w"; mkdir -p "$w"
  if [ -f "$HACK/modules/$name/go.mod" ]; then cp "$HACK/modules/$name"/go.* "$w/"; fi
  cd "$w"
  [ -f go.sum ]
}

# --- etcd ---------------------------------------------------------------------------------------
step "etcd v$ETCD: resolving"
if ! prepare_module etcd; then
  go mod init local/pdorch-etcd >/dev/null 2>&1
  go get -tool "go.etcd.io/etcd/server/v3@v$ETCD"
fi
step "etcd v$ETCD: compiling"
go build -trimpath -ldflags='-s -w' -o "$OUT.tmp/etcd" go.etcd.io/etcd/server/v3
mkdir -p "$OUT.tmp/modules/etcd"; cp go.mod go.sum "$OUT.tmp/modules/etcd/"
measure etcd

# --- kubernetes ---------------------------------------------------------------------------------
CMDS="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl"
step "kubernetes v$K8S: resolving"
if ! prepare_module kube; then
  go mod init local/pdorch-kube >/dev/null 2>&1
  KGOMOD=$(go mod download -json "k8s.io/kubernetes@v$K8S" | jsonfield GoMod)
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$KGOMOD"); do
    go mod edit -replace="$m=$m@v0.${K8S#1.}"
  done
  GD=$(sed -n 's/^godebug[[:space:]]\{1,\}//p' "$KGOMOD" | head -1)
  if [ -n "$GD" ]; then go mod edit -godebug="$GD"; fi
  for c in $CMDS; do go get -tool "$c@v$K8S"; done
fi
step "kubernetes v$K8S: compiling apiserver, controller-manager, scheduler, kubectl (the long step)"
MINOR=${K8S#1.}; MINOR=${MINOR%%.*}; NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ); LDF="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDF="$LDF -X $p.gitVersion=v$K8S -X $p.gitMajor=1 -X $p.gitMinor=$MINOR -X $p.gitTreeState=clean -X $p.buildDate=$NOW"
done
# shellcheck disable=SC2086
go build -trimpath -ldflags="$LDF" -o "$OUT.tmp/" $CMDS
mkdir -p "$OUT.tmp/modules/kube"; cp go.mod go.sum "$OUT.tmp/modules/kube/"
measure kubernetes

# --- kwok ---------------------------------------------------------------------------------------
step "kwok v$KWOK: resolving"
if ! prepare_module kwok; then
  go mod init local/pdorch-kwok >/dev/null 2>&1
  go get -tool "sigs.k8s.io/kwok/cmd/kwok@v$KWOK"
fi
step "kwok v$KWOK: compiling"
go build -trimpath -ldflags='-s -w' -o "$OUT.tmp/kwok" sigs.k8s.io/kwok/cmd/kwok
mkdir -p "$OUT.tmp/modules/kwok"; cp go.mod go.sum "$OUT.tmp/modules/kwok/"
measure kwok
KWOKDIR=$(go mod download -json "sigs.k8s.io/kwok@v$KWOK" | jsonfield Dir)

# --- lws ----------------------------------------------------------------------------------------
step "lws v$LWS: resolving"
if ! prepare_module lws; then
  go mod init local/pdorch-lws >/dev/null 2>&1
  go get -tool "sigs.k8s.io/lws/cmd@v$LWS"
fi
step "lws v$LWS: compiling"
go build -trimpath -ldflags='-s -w' -o "$OUT.tmp/lws-manager" sigs.k8s.io/lws/cmd
mkdir -p "$OUT.tmp/modules/lws"; cp go.mod go.sum "$OUT.tmp/modules/lws/"
measure lws
LWSDIR=$(go mod download -json "sigs.k8s.io/lws@v$LWS" | jsonfield Dir)

# --- data files from the module zips (the module cache is read-only: copy) -----------------------
step "copying kwok stages and LWS CRDs/webhook manifests"
mkdir -p "$OUT.tmp/kwok-stages" "$OUT.tmp/lws-crds" "$OUT.tmp/lws-webhook"
cp "$KWOKDIR"/kustomize/stage/node/fast/node-initialize.yaml \
   "$KWOKDIR"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
   "$KWOKDIR"/kustomize/stage/pod/fast/pod-ready.yaml \
   "$KWOKDIR"/kustomize/stage/pod/fast/pod-complete.yaml \
   "$KWOKDIR"/kustomize/stage/pod/fast/pod-delete.yaml "$OUT.tmp/kwok-stages/"
cp "$LWSDIR"/config/crd/bases/*.yaml "$OUT.tmp/lws-crds/"
cp "$LWSDIR"/config/webhook/*.yaml "$OUT.tmp/lws-webhook/"
printf 'k8s=%s\netcd=%s\nlws=%s\nkwok=%s\nbuild_seconds=%s\n' "$K8S" "$ETCD" "$LWS" "$KWOK" "$(( $(date +%s) - T0 ))" > "$OUT.tmp/versions.txt"
chmod -R u+w "$OUT.tmp"
touch "$OUT.tmp/.complete"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
step "done: $OUT"
echo "$OUT"
