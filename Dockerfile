# iChat images. Two targets from one file:
#   docker build -t REGISTRY/ichat-worker:0.1.0 .                    # worker (default, last stage)
#   docker build --target gateway -t REGISTRY/ichat-gateway:0.1.0 .  # the gateway (SMG), no CUDA
# deploy/kubernetes/ runs them; the ports below are the ones those manifests use.
# Only pyproject.toml, README.md and ichat/ are copied: no .venv or build output.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
ARG GATEWAY_BASE_IMAGE=python:3.12-slim

# ---------------------------------------------------------------- gateway (CPU only)
FROM ${GATEWAY_BASE_IMAGE} AS gateway
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/ichat
ENV PATH=/opt/ichat/bin:$PATH PYTHONUNBUFFERED=1
COPY pyproject.toml README.md /src/
COPY ichat /src/ichat
RUN pip install --no-cache-dir "/src[gateway]"
# 8080: OpenAI API of the gateway (--port); 8081: its Prometheus metrics (--port + 1)
EXPOSE 8080 8081
# tini is PID 1: it forwards SIGTERM to ichat and reaps orphans
ENTRYPOINT ["tini", "--", "ichat"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------- worker (GPU)
FROM ${CUDA_IMAGE} AS worker
ENV DEBIAN_FRONTEND=noninteractive
# python3-dev and gcc: Triton compiles small helpers when the engine starts
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc tini \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/ichat
ENV PATH=/opt/ichat/bin:$PATH PYTHONUNBUFFERED=1
COPY pyproject.toml README.md /src/
COPY ichat /src/ichat
RUN pip install --no-cache-dir "/src[vllm]"
# 8000: the OpenAI API (--port); 8001: /readyz /livez /status (--status-port)
EXPOSE 8000 8001
# tini is PID 1: it forwards SIGTERM to ichat (one signal: drain) and reaps engine
# processes orphaned by a crash
ENTRYPOINT ["tini", "--", "ichat"]
CMD ["serve", "--backend", "vllm", "--help"]
