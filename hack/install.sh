#!/usr/bin/env bash
# One command installs everything pdorch's tests and demo need on a fresh machine:
# the pdorch package with its test tools into the current python3 (direct dependencies pinned in
# pyproject.toml, everything they pull in by constraints.txt from hack/lock-deps.py),
# then the real control-plane binaries, built from the Go module proxy into ~/.cache/pdorch/kube,
# helm into ~/.cache/pdorch/helm and Prometheus into ~/.cache/pdorch/prometheus (cold: tens of
# minutes on 2 cores; a warm cache builds nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "[install] python packages (pdorch + dev tools, at the versions in constraints.txt)"
python3 -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
echo "[install] control-plane binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, lws)"
python3 -m pdorch.cli dev-cluster build
echo "[install] helm (renders charts/pdorch in the packaging tests), into ${PDORCH_HELM_CACHE:-${PDORCH_CACHE:-~/.cache/pdorch}/helm}"
# Progress and errors go to stderr (shown); the last stdout line is the output directory.
helm_dir=$(./hack/build-helm.sh | tail -1)
echo "[install] helm is $helm_dir/helm (not on PATH; the tests find it there)"
echo "[install] prometheus (the scaler's Prometheus source is tested against it), into ${PDORCH_PROMETHEUS_CACHE:-${PDORCH_CACHE:-~/.cache/pdorch}/prometheus}"
prometheus_dir=$(./hack/build-prometheus.sh | tail -1)
echo "[install] prometheus is $prometheus_dir/prometheus (not on PATH; the tests find it there)"
echo "[install] done"
