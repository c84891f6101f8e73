# syntax=docker/dockerfile:1
# charlm service image. CPU PyTorch by default; for CUDA build with e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t charlm:cuda .
# and run with --gpus all -e CHARLM_DEVICE=cuda.
# Behind a proxy or with a private index (see README, "Docker"): --build-arg PIP_INDEX_URL=...
# (also PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, TORCH_INDEX) and --secret id=pip_ca,src=ca.pem for
# a CA bundle pip must trust. They reach only the build stage's pip; the final image has none.
# With buildah/podman, build with --format docker: the OCI format drops the HEALTHCHECK.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
# pip ignores an empty setting, so unset build args change nothing.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_TRUSTED_HOST=${PIP_TRUSTED_HOST}
# A C compiler for the decode kernels (charlm/_native.c); the final image does not need it.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY charlm ./charlm
COPY app ./app
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && pip install .
# The shipped models (only models/*.safetensors: .dockerignore leaves the cards, plots and training
# state out), owned by root and read-only to everyone else whatever modes the checkout gave them (a
# umask of 002 or 000 would leave them group- or world-writable): the server's uid reads them and can
# never rewrite them.
COPY models ./models
RUN chown -R 0:0 models && chmod -R u=rwX,go=rX models

FROM ${PYTHON_IMAGE}
# The decode kernels (charlm/_native*.so) link the system OpenMP runtime.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 charlm
# Code and models stay root's: uid 10001 may read and run them, never change them (tests/test_image.py).
COPY --from=build --chown=0:0 /opt/venv /opt/venv
COPY --from=build --chown=0:0 /src/models /srv/charlm/models
# Every *.safetensors in /srv/charlm/models is a model, named by its file's stem: the shipped
# mysterious_island (the default: the server's choice when it is there) and verne_small. To serve
# models of your own, mount their directory there read-only (-v "$PWD/my-models:/srv/charlm/models:ro");
# without a mysterious_island among them the default is the first id in sorted order, or name one
# with -e CHARLM_DEFAULT_MODEL=... (not set here, so that such a mount needs no more than itself).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHARLM_MODELS=/srv/charlm/models \
    CHARLM_HOST=0.0.0.0 \
    CHARLM_PORT=8000
USER 10001:10001
# Fail the build, not the service, when the native decode kernels would not load here.
RUN python -c "from charlm import native; assert native.load() is not None, 'charlm._native did not load'"
WORKDIR /srv/charlm
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["charlm", "serve"]
