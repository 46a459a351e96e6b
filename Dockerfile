# The engine's one image: `mediamarket serve --no-worker` (API), `mediamarket worker`, and the
# one-off admin commands all run from it (see compose.yaml). Build: docker build -t mediamarket .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mediamarket
WORKDIR /src
# Every dependency ships manylinux wheels (PyAV bundles its FFmpeg libraries, psycopg[binary]
# its libpq), so the image needs no compiler and no system libraries: --only-binary says so.
COPY pyproject.toml README.md ./
COPY domain ./domain
COPY projections ./projections
COPY adapters ./adapters
COPY services ./services
COPY api ./api
RUN /opt/mediamarket/bin/pip install --only-binary=:all: . \
    && /opt/mediamarket/bin/mediamarket --help > /dev/null

FROM python:3.11-slim
COPY --from=build /opt/mediamarket /opt/mediamarket
# A fixed uid, so a mounted volume's ownership can be set to match.
RUN useradd --system --uid 10001 --create-home --home-dir /home/mediamarket mediamarket \
    && mkdir -p /srv/mediamarket/data \
    && chown -R mediamarket /srv/mediamarket
# The working directory holds ./data: scratch files for videos on their way to S3, and
# nothing that must survive the container (the state is in PostgreSQL and S3).
WORKDIR /srv/mediamarket
USER mediamarket
ENV PATH=/opt/mediamarket/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    MEDIAMARKET_DEMO=false
EXPOSE 8080
# Unhealthy when the API does not answer or answers "degraded" (a projection stuck on an
# event: it keeps serving what it holds, but an operator must look). Workers serve no HTTP;
# compose.yaml turns this off for them.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c 'import json, os, sys, urllib.request as u; r = u.urlopen("http://127.0.0.1:%s/healthz" % os.environ.get("PORT", "8080"), timeout=2); sys.exit(json.load(r)["status"] != "ok")'
ENTRYPOINT ["mediamarket"]
CMD ["serve", "--no-worker"]
