# syntax=docker/dockerfile:1
# vigil-exporter: the Prometheus exporter. Build context: the repository root.
#   docker build -f deploy/images/exporter.Dockerfile \
#       --build-arg REVISION=$(git rev-parse --short=12 HEAD) \
#       -t ghcr.io/vigil/vigil-exporter:0.1.0 .
# The build stage runs deploy/images/build.sh, which deploy/images/check.sh also runs
# (into a staging directory) and checks; keep the two in step.

# Debian 12 in both stages: the binary links glibc 2.36 and libgcc_s only, which the
# distroless "cc" image carries (glibc, libgcc, CA certificates, /etc/passwd).
ARG RUST_IMAGE=docker.io/library/rust:1.88-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
# The exporter's build script reads the revision from git, which the context lacks.
ARG REVISION=unknown
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    VIGIL_BUILD_REVISION=${REVISION} deploy/images/build.sh exporter /rootfs

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="vigil-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Vigil's and HAMi-core's shared-memory regions" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/vigil/vigil"
COPY --from=build /rootfs/ /
# Numeric, so that the kubelet's runAsNonRoot can verify it (nobody, as in the manifests).
USER 65534:65534
EXPOSE 9477
ENTRYPOINT ["/usr/local/bin/vigil-exporter"]
