# The image launch/xpk.sh runs on GKE (and any container platform): this checkout installed with
# one extra. TPU (default): docker build -t vdit . ; NVIDIA GPU: docker build --build-arg=EXTRA=cuda -t vdit .
# Every worker runs `vdit COMMAND ...` in /app (configs/ is there, so --config=configs/... works).
FROM python:3.11-slim

ARG EXTRA=tpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md BUILD.md ./
COPY vdit ./vdit
COPY configs ./configs
COPY launch ./launch
RUN pip install -e ".[${EXTRA}]"
