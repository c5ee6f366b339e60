# The dunning worker (and CLI) for production. Build: docker build -t dunning .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 dunning
WORKDIR /app
COPY . .
# Editable on purpose: templates/ and policies/ are read from the source tree.
RUN pip install -e /app && chown -R dunning:dunning /app

USER dunning
ENTRYPOINT ["dunning"]
CMD ["worker"]
