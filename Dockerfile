# lsmtpd image: `docker build -t lsmtpd .` then see docker-compose.yml.
# The build command is the one CI and debian/rules run.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lsmtpd -p lsmtpctl \
 && install -D -m 0755 target/release/lsmtpd /out/usr/bin/lsmtpd \
 && install -D -m 0755 target/release/lsmtpctl /out/usr/bin/lsmtpctl \
 && strip /out/usr/bin/lsmtpd /out/usr/bin/lsmtpctl

FROM debian:bookworm-slim
# The image's own user, uid/gid 10025 (not root; nothing to bind below 1024).
RUN groupadd --system --gid 10025 lsmtpd \
 && useradd --system --uid 10025 --gid lsmtpd --home-dir /var/lib/lsmtpd --no-create-home \
      --shell /usr/sbin/nologin lsmtpd \
 && install -d -o lsmtpd -g lsmtpd -m 0750 /var/lib/lsmtpd /run/lsmtpd
COPY --from=build /out/usr/bin/ /usr/bin/

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
