# syntax=docker/dockerfile:1
# One image for the trainer and the server; the entry point is the `fovea` CLI:
#   docker run IMAGE train --data /data/images --models /models --name flowers
#   docker run IMAGE serve --model-dir /models
#
# Why this base (build ARG BASE_IMAGE; see docs/deploy.md, "The image"):
# - nvidia/cuda "base" for Ubuntu 22.04 is GPU-capable: it sets NVIDIA_VISIBLE_DEVICES,
#   NVIDIA_DRIVER_CAPABILITIES and NVIDIA_REQUIRE_CUDA, so the NVIDIA container runtime mounts the
#   driver and refuses, with a clear message, a driver too old for CUDA 12.5 (the CUDA that
#   TensorFlow 2.21 is built against).
# - It is the small flavour (CUDA runtime only). cuDNN, cuBLAS & co. come from the
#   `tensorflow[and-cuda]` wheels, at the versions TensorFlow pins; a "cudnn-runtime" base would add
#   ~2 GB of libraries whose versions TensorFlow does not choose.
# - Python 3.11, the version fovea is tested with, is an Ubuntu 22.04 package (also Debian 12's).
# Any Debian/Ubuntu base with a python3.11 package works, e.g. a CPU-only image:
#   docker build --build-arg BASE_IMAGE=ubuntu:22.04 --build-arg TF_EXTRA= -t fovea:cpu .
ARG BASE_IMAGE=nvidia/cuda:12.5.1-base-ubuntu22.04

# ---- builder: compilers and headers, in case a dependency has no wheel for this platform ----
FROM ${BASE_IMAGE} AS builder
ARG PYTHON=python3.11
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Package versions follow the base image's release; pinning them breaks the build at every
# security update of the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential ca-certificates "${PYTHON}" "${PYTHON}-dev" "${PYTHON}-venv" \
 && rm -rf /var/lib/apt/lists/*
RUN "${PYTHON}" -m venv /opt/fovea \
 && /opt/fovea/bin/pip install --no-cache-dir --upgrade pip==25.2
ENV PATH=/opt/fovea/bin:$PATH
WORKDIR /src
# .dockerignore keeps the context to pyproject.toml, README.md and the package sources.
COPY . .
# The README's install, plus the CUDA libraries as TensorFlow's own extra (empty TF_EXTRA: CPU only).
# The TensorFlow version must equal the pin in pyproject.toml (tests/test_deploy_dockerfile.py checks).
ARG TF_EXTRA=and-cuda
# DL3013 reads the local project '.[server,trainer]' as an unpinned PyPI name; its versions come from
# pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[server,trainer]' "tensorflow[${TF_EXTRA}]==2.21.0" \
 && fovea train --help >/dev/null \
 && fovea serve --help >/dev/null

# ---- final: the interpreter, the venv, a non-root user; no compilers ----
FROM ${BASE_IMAGE}
ARG PYTHON=python3.11
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned apt packages, as in the builder: the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates "${PYTHON}" \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 fovea \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fovea
COPY --from=builder /opt/fovea /opt/fovea
# HOME, Matplotlib's and Keras's caches point at /tmp: the pods run with a read-only root
# filesystem and an emptyDir on /tmp. TF_FORCE_GPU_ALLOW_GROWTH: take GPU memory as needed, not all.
ENV PATH=/opt/fovea/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/tmp/keras \
    TF_CPP_MIN_LOG_LEVEL=1 \
    TF_FORCE_GPU_ALLOW_GROWTH=true
USER 10001:10001
WORKDIR /tmp
# gRPC (fovea serve --port) and Prometheus metrics (--metrics-port).
EXPOSE 8500 8080 9090
# Kubernetes probes the gRPC health service natively; this covers `docker run` only.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["fovea", "health", "--target", "localhost:8500", "--timeout", "5"]
ENTRYPOINT ["fovea"]
CMD ["--help"]
