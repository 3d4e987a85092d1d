# syntax=docker/dockerfile:1
# pyswpt: one image for every command of the node (see docker/entrypoint.sh).

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY pyswpt ./pyswpt
COPY sql ./sql
RUN pip install --no-cache-dir .

FROM python:3.11-slim AS runtime
# psql is for operators (`docker compose exec accounts psql "$POSTGRES_URL"`); the
# distribution's current client is wanted, not a pinned one that disappears.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 pyswpt
COPY --from=build /opt/venv /opt/venv
WORKDIR /usr/src/app
COPY sql ./sql
COPY yoyo.ini ./
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYSWPT_SQL_DIR=/usr/src/app/sql \
    APP_ROOT_DIR=/usr/src/app \
    PYTHONUNBUFFERED=1
USER 10001
# The fetch API, and the node's metrics (METRICS_PORT).
EXPOSE 8080 9464
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["all"]

# The test suite, against the servers named by PYSWPT_TEST_* (see compose.yaml).
FROM runtime AS test
USER 0
COPY pyproject.toml README.md /src/
COPY pyswpt /src/pyswpt
COPY sql /src/sql
RUN pip install --no-cache-dir "/src[test]"
COPY tests ./tests
COPY pyproject.toml ./
USER 10001
CMD ["test"]
