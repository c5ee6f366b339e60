# The dunning worker and CLI for production.
#   docker build -t dunning .          docker run --rm dunning --help
# docker-compose.yml builds it for the `migrate` job and the `worker`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --user-group --uid 10001 dunning

WORKDIR /app
COPY . /app

# Editable on purpose: templates/ and policies/ are read from the repository tree (/app).
# The code stays owned by root, read-only for the worker; only the state directory of the
# embedded SQLite default (.dunning/, relative to /app) is writable by it.
RUN pip install --no-cache-dir --require-hashes -r /app/requirements.lock \
    && pip install --no-cache-dir --no-deps --no-build-isolation -e /app \
    && python -m compileall -q /app/workflows /app/models /app/activities \
    && mkdir -p /app/.dunning \
    && chown dunning:dunning /app/.dunning

USER dunning
ENTRYPOINT ["dunning"]
CMD ["worker"]
