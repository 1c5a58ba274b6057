# completions-proxy: slim, non-root, database on a volume, `serve` by default.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fast]'

FROM python:3.12-slim
RUN useradd --system --uid 10001 --create-home --home-dir /home/proxy proxy \
    && mkdir /data && chown proxy:proxy /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER proxy
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
ENTRYPOINT ["completions-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--db", "/data/completions.db"]
