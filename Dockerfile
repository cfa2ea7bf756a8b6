# modelgate container image.
#   docker build -t modelgate .
#   docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/models:/models modelgate
#
# Build stage: scripts/build.sh, the script scripts/serve.sh runs too (the ONNX Runtime
# library from the PyPI wheel, a release build), so what CI tests is what the image runs;
# here with the `dist` profile (release plus whole-program optimisation, Cargo.toml).
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN MODELGATE_BUILD_PROFILE=dist scripts/build.sh /opt/onnxruntime

# Run stage: slim Debian, non-root, the library where the binary looks for it (../lib).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin modelgate
COPY --from=build /src/target/dist/modelgate /usr/local/bin/modelgate
COPY --from=build /opt/onnxruntime/libonnxruntime.so.1.31.1 /usr/local/lib/libonnxruntime.so.1.31.1
COPY --chown=modelgate:modelgate models /models
USER modelgate
VOLUME /models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD curl -fsS http://127.0.0.1:8000/v2/health/ready || exit 1
# SIGTERM drains in-flight requests, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["modelgate", "serve"]
CMD ["--model-repository", "/models"]
