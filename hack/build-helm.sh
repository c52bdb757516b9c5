#!/usr/bin/env bash
# Builds helm (helm.sh/helm/v3/cmd/helm) from the Go module proxy at a pinned version into a
# versioned cache outside the repo, the same way hack/build-kube.sh builds the control plane.
# pdorch's tests use it to render charts/pdorch and compare it with the kustomize base.
# A warm cache builds nothing. The wrapper module hack/modules/helm (go.mod + go.sum committed)
# pins every dependency. Env overrides: PDORCH_HELM_CACHE (root), HELM (version).
# Prints the output directory on its last line.
set -euo pipefail
HELM=${HELM:-3.19.5}
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-tool.sh
source "$HACK/go-tool.sh"
go_tool_begin helm "$HELM" "${PDORCH_HELM_CACHE:-${PDORCH_CACHE:-$HOME/.cache/pdorch}/helm}" helm.sh/helm/v3/cmd/helm
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
go_tool_end helm "$HELM"
