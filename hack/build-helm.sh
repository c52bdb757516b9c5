#!/usr/bin/env bash
# Builds helm (helm.sh/helm/v3/cmd/helm) from the Go module proxy at a pinned version into a
# versioned cache outside the repo, the same way hack/build-kube.sh builds the control plane.
# pdorch's tests use it to render charts/pdorch and compare it with the kustomize base.
# A warm cache builds nothing. The wrapper module hack/modules/helm (go.mod + go.sum committed)
# pins every dependency. Env overrides: PDORCH_HELM_CACHE (root), HELM (version).
# Prints the output directory on its last line.
set -euo pipefail
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
HELM=${HELM:-3.19.5}
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=${PDORCH_HELM_CACHE:-${PDORCH_CACHE:-$HOME/.cache/pdorch}/helm}
OUT=$ROOT/helm$HELM
if [ -f "$OUT/.complete" ] && [ -x "$OUT/helm" ]; then
  echo "cached: $OUT"; echo "$OUT"; exit 0
fi
# Checked only now: a warm cache needs no Go. Without this the first `go` call fails mid-script.
if ! command -v go >/dev/null 2>&1; then
  echo "build-helm: 'go' not found on PATH; install Go 1.26 (https://go.dev/dl/) and put it on PATH, then retry" >&2
  exit 127
fi
T0=$(date +%s)
step() { echo "[build-helm +$(( $(date +%s) - T0 ))s] $*" >&2; }
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
# Scratch copy of the wrapper module outside the git tree (no VCS stamping surprises).
W=$ROOT/src/helm
rm -rf "$W"; mkdir -p "$W"
cd "$W"
step "helm v$HELM: resolving"
if [ -f "$HACK/modules/helm/go.sum" ]; then
  cp "$HACK/modules/helm"/go.* "$W/"
else
  go mod init local/pdorch-helm >/dev/null 2>&1
  go get -tool "helm.sh/helm/v3/cmd/helm@v$HELM"
fi
step "helm v$HELM: compiling"
# As helm's own Makefile does: stamp the version, and the Kubernetes version of its client-go
# modules as the default `.Capabilities.KubeVersion` (unstamped, `helm template` assumes v1.20).
KV=$(go list -m -f '{{.Version}}' k8s.io/client-go)   # v0.34.2 -> Kubernetes 1.34
KMINOR=${KV#v0.}; KMINOR=${KMINOR%%.*}
LDF="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  LDF="$LDF -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$KMINOR"
done
go build -trimpath -ldflags="$LDF" -o "$OUT.tmp/helm" helm.sh/helm/v3/cmd/helm
mkdir -p "$OUT.tmp/modules/helm"; cp go.mod go.sum "$OUT.tmp/modules/helm/"
printf 'helm=%s\nbuild_seconds=%s\n' "$HELM" "$(( $(date +%s) - T0 ))" > "$OUT.tmp/versions.txt"
touch "$OUT.tmp/.complete"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
step "done: $OUT"
echo "$OUT"
