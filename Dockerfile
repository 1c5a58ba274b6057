# completions-proxy: slim, non-root (uid 10001), database on the /data volume, `serve` by
# default. The base image is pinned to an exact Python and Debian release, and every Python
# package to the version in constraints.txt; .ci/run installs the same way in a fresh venv.
FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt '.[fast]'

FROM python:3.12.8-slim-bookworm
RUN useradd --system --uid 10001 --user-group --no-create-home proxy \
    && mkdir /data \
    && chown 10001:10001 /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# Exec form; `health` reads the port and config from the serve command of process 1, so a
# changed CMD or config needs no change here.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["completions-proxy", "health"]
# SIGTERM drains requests in flight for up to server.shutdown_timeout (30 s by default), but
# docker stop kills after 10 s: stop with `docker stop -t 40` (Compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["completions-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--db", "/data/completions.db"]
