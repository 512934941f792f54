# Multi-stage build of the `tally` binary. librdkafka is built from source (bundled),
# which needs a C toolchain in the build stage only.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tally

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tally /usr/local/bin/tally
# The partition owners' local state stores (ADR 10); mount a volume here to restart fast.
RUN mkdir -p /var/lib/tally/state && chown 10001 /var/lib/tally/state
ENV TALLY_STATE_DIR=/var/lib/tally/state
USER 10001
EXPOSE 8080
ENV TALLY_LISTEN=0.0.0.0:8080
HEALTHCHECK --interval=5s --timeout=3s --retries=20 CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["tally"]
CMD ["serve"]
