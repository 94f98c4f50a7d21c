# syntax=docker/dockerfile:1.7
# One image for every service; the service is chosen by the command, e.g.
#   docker run IMAGE services.recorder          (runs: python -m services.recorder)
# Build: docker build -t zvt-fleet:$(git rev-parse --short HEAD) .

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# --- build: wheels for the dependencies (a cached layer), then for the project ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only the dependency list first: this layer is rebuilt when pyproject.toml changes, not on
# every source change.
COPY pyproject.toml README.md ./
RUN mkdir -p services devstack && touch services/__init__.py devstack/__init__.py \
 && pip wheel --wheel-dir /wheels . \
 && rm -f /wheels/zvt_fleet-*.whl
COPY services ./services
COPY devstack ./devstack
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    HOME=/tmp
# tini as PID 1: forwards SIGTERM to the service and reaps children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels zvt-fleet
RUN groupadd --gid 10001 zvt && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin zvt
USER 10001:10001
# The chart runs it with a read-only root filesystem and an emptyDir on /tmp (HOME, WORKDIR).
WORKDIR /tmp
# 8081: /healthz, /readyz, /metrics of every service (ZVT_HTTP_PORT); 8080: the gateway's API.
EXPOSE 8081 8080
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m"]
CMD ["services.recorder"]
