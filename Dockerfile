# IRG Server, GPU image: one image for the API (`irg serve`) and the GPU worker (`irg worker`).
#
#   docker build -t irg-server .
#   docker compose -f docker/compose.yaml up -d          (Redis + API + GPU workers; see docs/deploy.md)
#
# Base: the official PyTorch runtime image with the torch the pyproject pins (2.13) on CUDA 12.6 + cuDNN 9,
# so `pip install .` keeps its torch. Hosts whose driver supports CUDA 13 can pass
# --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime. Weights are never in the image:
# mount a model directory at /models.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The build context is limited by .dockerignore to what the package needs (pyproject + its packages).
WORKDIR /opt/irg-server
COPY . .
# The same install as CI: this repository's pyproject, nothing else. `irg --help` fails the build if the
# entry point or an import is broken.
RUN pip install . && irg --help > /dev/null

COPY docker/claim_gpu.py /usr/local/bin/irg-claim-gpu
RUN chmod 0755 /usr/local/bin/irg-claim-gpu \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin irg \
    && mkdir -p /models /var/lib/irg/gpu-locks \
    && chown irg:irg /models /var/lib/irg/gpu-locks

USER irg
ENV HOME=/home/irg \
    HF_HOME=/home/irg/.cache/huggingface \
    IRG_HOME=/home/irg/.cache/irg-server \
    IRG_MODEL_DIR=/models/bagel-7b-mot \
    IRG_GPU_LOCK_DIR=/var/lib/irg/gpu-locks
VOLUME ["/models"]
EXPOSE 8000

# The API's liveness; compose turns it off for workers (their readiness is their heartbeat in Redis).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["irg", "serve", "--host", "0.0.0.0"]
