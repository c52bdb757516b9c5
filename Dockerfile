# syntax=docker/dockerfile:1
# One image for every pdorch process: `pdorch controller`, `pdorch proxy`, `pdorch sim`.
#
#   docker build -t ghcr.io/pdorch/pdorch:0.1.0 .
#   docker run --rm --read-only --user 65532:65532 ghcr.io/pdorch/pdorch:0.1.0 --help
#
# Runs as a numeric non-root user (65532, as the Deployment's securityContext and the restricted Pod
# Security Standard expect) and with a read-only root filesystem: bytecode is compiled at build
# time, Python never writes .pyc files at run time, and HOME/TMPDIR point at /tmp (mount an
# emptyDir there if anything needs scratch space). The base image is pinned by version; pin it by
# digest as well in your own registry mirror. tests/unit/test_dockerfile.py checks these invariants.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The package with its dependencies (pinned in pyproject.toml), in one layer.
COPY pyproject.toml README.md ./
COPY pdorch ./pdorch
RUN python -m venv /opt/pdorch \
 && /opt/pdorch/bin/pip install --no-compile . \
 # Bytecode now, because the root filesystem is read-only at run time.
 && /opt/pdorch/bin/python -m compileall -q /opt/pdorch/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pdorch" \
      org.opencontainers.image.description="pdorch controller, P/D proxy and simulated engine" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/pdorch /opt/pdorch
ENV PATH=/opt/pdorch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
USER 65532:65532
WORKDIR /tmp
# 8000: proxy / simulated engine HTTP; 8081: controller health and metrics; 8998: SGLang bootstrap (sim).
EXPOSE 8000 8081 8998
ENTRYPOINT ["pdorch"]
CMD ["--help"]
