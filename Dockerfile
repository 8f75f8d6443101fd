# lsmtpd image: `docker build -t lsmtpd .` (or `podman build --format docker -t lsmtpd .`), then
# see docker-compose.yml. The build command is the one CI and debian/rules run.
#
# Stages:
#   build    compiles lsmtpd and lsmtpctl (rust:1-bookworm)
#   runtime  the image without binaries: user, directories, environment, health check
#   prebuilt runtime + binaries taken from the build context's bin/ directory; CI builds this
#            (`--target prebuilt`) from the binaries it compiled and tested itself, see
#            tests/container-test
#   image    runtime + binaries from the build stage; the default (last) target
#
# BASE_IMAGE: the Debian the runtime runs on (default debian:bookworm-slim). CI, which cannot pull
# images, builds its own from Debian packages with mmdebstrap.

ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lsmtpd -p lsmtpctl \
 && install -D -m 0755 target/release/lsmtpd /out/lsmtpd \
 && install -D -m 0755 target/release/lsmtpctl /out/lsmtpctl \
 && strip /out/lsmtpd /out/lsmtpctl

# The CA bundle for amqp.tls (AMQPS to a broker with a public certificate); only the bundle
# goes into the image, not openssl, which Debian's ca-certificates needs to build it.
FROM ${BASE_IMAGE} AS certs
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates

FROM ${BASE_IMAGE} AS runtime
COPY --from=certs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The image's own user, uid/gid 10025 (not root; nothing to bind below 1024).
RUN groupadd --system --gid 10025 lsmtpd \
 && useradd --system --uid 10025 --gid lsmtpd --home-dir /var/lib/lsmtpd --no-create-home \
      --shell /usr/sbin/nologin lsmtpd \
 && install -d -o lsmtpd -g lsmtpd -m 0750 /var/lib/lsmtpd /run/lsmtpd

# Configured like the binary: by environment variables (the original LSMTPD's names and
# LSMTPD_*), on top of the built-in defaults; mount a file and add `--config` for the rest.
ENV BIND_ADDRESS=0.0.0.0 \
    BIND_PORT=2525 \
    LSMTPD_SPOOL_DIR=/var/lib/lsmtpd \
    LSMTPD_ADMIN_SOCKET=/run/lsmtpd/lsmtpd.sock \
    LSMTPD_LOG=info

# The spool must outlive the container: every 250 is on this volume.
VOLUME ["/var/lib/lsmtpd"]
EXPOSE 2525
USER lsmtpd
# SIGTERM starts the graceful shutdown (shutdown.grace, 30 s): give `docker stop -t 45`.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/bin/lsmtpctl", "status"]
ENTRYPOINT ["/usr/bin/lsmtpd"]

FROM runtime AS prebuilt
COPY bin/lsmtpd bin/lsmtpctl /usr/bin/

FROM runtime AS image
COPY --from=build /out/lsmtpd /out/lsmtpctl /usr/bin/
