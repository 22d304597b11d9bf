# A slim image whose default command runs a worker.
# Build: docker build -t taskloom .   Run: docker run -e APP=app.tasks:rt taskloom
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    APP=app.tasks:rt

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY brokers ./brokers
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 taskloom
USER 10001

# SIGTERM drains in-flight tasks (see README, "Signals").
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "exec taskloom worker \"$APP\""]
