# The dunning worker and CLI for production.
#   docker build -t dunning .          docker run --rm dunning --help
# docker-compose.yml builds it for the `migrate` job and the `worker`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The final notice letter is a PDF: DejaVu draws Latin, Greek, Cyrillic and most currency
# symbols (the slim image has no font at all, so letters would fall back to Latin-1). Customers
# who write in Chinese, Japanese or Korean: build with --build-arg LETTER_FONTS="fonts-dejavu-core
# fonts-noto-cjk" (about 60 MB more); without it their names and dates are written plainly.
ARG LETTER_FONTS="fonts-dejavu-core"
RUN apt-get update \
    && apt-get install --yes --no-install-recommends ${LETTER_FONTS} \
    && rm -rf /var/lib/apt/lists/*

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
