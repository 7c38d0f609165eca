# inbox-exporter container image.
#
#   docker build -t inbox-exporter:0.1.0 .
#   docker run --rm -p 9857:9857 -e SALES_PASSWORD=... \
#     -v "$PWD/config.yaml:/etc/inbox-exporter/config.yaml:ro" inbox-exporter:0.1.0
#
# Two stages: the builder fetches the dependencies exactly as requirements/runtime.lock pins
# them (every file checked against the lock's SHA-256, `--require-hashes`; scripts/lock makes the
# lock from pyproject.toml), turns the source into a wheel (`pip wheel`) with the build backend
# exactly as requirements/build.lock pins it (hash-checked too, `--no-build-isolation`: nothing
# is fetched to build it) and installs that wheel and those dependencies, nothing else, into a
# virtualenv at /opt/inbox-exporter; the runtime stage is a plain python:3.11-slim image with
# that virtualenv copied in, no compiler, no build tools, no pip cache, running as the non-root
# user 65532. The daemon handles SIGTERM itself, so it runs as PID 1 without an init. It writes
# nothing to disk: run it with a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: wheel + virtualenv ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# 1. the dependencies' wheels, each pinned and hash-checked by the lock. A layer of its own, before
#    the source is copied: a change to the code alone rebuilds from step 3.
COPY requirements/runtime.lock requirements/build.lock requirements/
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements/runtime.lock

# 2. the build backend (setuptools), pinned and hash-checked by requirements/build.lock, in a
#    virtualenv of its own at /opt/build: step 3 builds with it and with nothing else (not the
#    base image's setuptools, nor one an isolated build would fetch from the index unpinned).
RUN python -m venv --without-pip /opt/build \
 && pip --python /opt/build/bin/python install --no-cache-dir --require-hashes --no-deps \
        -r requirements/build.lock

# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY daemon/ daemon/

# 3. inbox-exporter's own wheel, built from source by the backend of step 2 (the outer pip runs
#    in that virtualenv, --python; --no-build-isolation: no build environment is fetched) without
#    resolving its dependencies again (--no-deps: they are the lock's, from step 1);
# 4. a virtualenv without pip or setuptools, populated from those wheels only (--no-index): the
#    dependencies can only be the locked ones. The outer pip installs into it (--python), so the
#    runtime image carries no installer.
RUN pip --python /opt/build/bin/python wheel --no-cache-dir --no-build-isolation --no-deps \
        --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/inbox-exporter \
 && pip --python /opt/inbox-exporter/bin/python install --no-cache-dir --no-index \
        --find-links /wheels /wheels/inbox_exporter-*.whl \
 && /opt/inbox-exporter/bin/inbox-exporter --version

# --- runtime --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="inbox-exporter" \
      org.opencontainers.image.description="Prometheus exporter that verifies connected inboxes over IMAP and SMTP, step by step, and says why one fails" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/inbox-exporter/inbox-exporter" \
      org.opencontainers.image.url="https://github.com/inbox-exporter/inbox-exporter" \
      org.opencontainers.image.documentation="https://github.com/inbox-exporter/inbox-exporter/blob/main/README.md" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# A fixed, numeric non-root UID/GID (65532, as in distroless "nonroot"), so Kubernetes can
# verify runAsNonRoot and the Helm chart's runAsUser matches.
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --no-log-init --uid 65532 --gid 65532 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin nonroot

COPY --from=builder /opt/inbox-exporter /opt/inbox-exporter

ENV PATH=/opt/inbox-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 65532:65532
WORKDIR /
EXPOSE 9857
STOPSIGNAL SIGTERM
ENTRYPOINT ["inbox-exporter"]
CMD ["run", "--config.file=/etc/inbox-exporter/config.yaml"]
