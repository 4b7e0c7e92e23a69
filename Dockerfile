# The gateway image: slim, non-root, with a health check. The engine (vLLM) runs elsewhere, on a private address.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY gateway ./gateway
RUN pip install -c requirements.lock . \
 && useradd --system --uid 10001 --no-create-home --home-dir /app gateway \
 && mkdir -p /app/var \
 && chown gateway:gateway /app/var
COPY policies ./policies

USER gateway
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_DATA_DIR=/app/var \
    GATEWAY_POLICIES_DIR=/app/policies
EXPOSE 8080
VOLUME ["/app/var"]

HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]

CMD ["gateway", "serve"]
