# ringhub in a container: a build stage with the Rust toolchain, and a small runtime
# image with the binary alone (it links only the C library; mimalloc is built in).
#
#   docker build -t ringhub .
#   docker run --rm -p 5000:5000 --ulimit nofile=65536:65536 ringhub
#
# Docker's default seccomp profile (since 25) denies io_uring: ringhub then runs on
# epoll and says so at startup, with what it costs. To run it on io_uring, allow the
# io_uring_setup, io_uring_enter and io_uring_register system calls with a profile of
# your own (--security-opt seccomp=/path/to/profile.json), or
# --security-opt seccomp=unconfined. README, "Deploying", has the rest.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ringhub-engine --bin ringhub

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home ringhub \
    && mkdir /data && chown ringhub /data
COPY --from=build /src/target/release/ringhub /usr/local/bin/ringhub
USER ringhub
# Every interface inside the container (the port is published by `docker run -p`);
# durable membership in the volume.
ENV RINGHUB_LISTEN=0.0.0.0:5000 RINGHUB_DATA=/data
VOLUME /data
EXPOSE 5000
# Probes: GET /healthz (liveness) and GET /readyz (readiness; 503 while draining or
# while Redis does not answer).
ENTRYPOINT ["ringhub"]
CMD ["serve"]
