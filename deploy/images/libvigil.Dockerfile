# syntax=docker/dockerfile:1
# libvigil: carries /opt/vigil/lib/libvigil.so and its installer /opt/vigil/bin/vigil-install
# (POSIX sh). Build context: the repository root.
#   docker build -f deploy/images/libvigil.Dockerfile \
#       -t ghcr.io/vigil/libvigil:0.1.0 .
# Run as an init container: `/opt/vigil/bin/vigil-install DEST_DIR` (deploy/images/README.md).
# The build stage runs deploy/images/build.sh, which deploy/images/check.sh also runs
# (into a staging directory) and checks; keep the two in step.

# libvigil.so is linked for glibc 2.17 with zig (cargo-zigbuild, pinned with hashes in
# deploy/images/build-requirements.txt), so it loads into workloads of any image from
# CentOS 7 and Ubuntu 18.04 on, whatever the build image's own glibc.
ARG RUST_IMAGE=docker.io/library/rust:1.88-slim-bookworm
# The installer needs a POSIX sh with sha256sum, mktemp, cat, chmod, mv, mkdir, rm, sync,
# tr, grep, tail, id, dirname, basename: busybox has them all.
ARG BASE_IMAGE=docker.io/library/busybox:1.36.1-musl

FROM ${RUST_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/images/build-requirements.txt /tmp/build-requirements.txt
RUN python3 -m venv /opt/zig \
    && /opt/zig/bin/pip install --no-cache-dir --require-hashes -r /tmp/build-requirements.txt
ENV PATH=/opt/zig/bin:$PATH
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    deploy/images/build.sh libvigil /rootfs

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="libvigil" \
      org.opencontainers.image.description="Vigil's CUDA interposer libvigil.so and its installer vigil-install" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/vigil/vigil"
COPY --from=build /rootfs/ /
# Non-root by default (an emptyDir is writable by anyone); installing into a node's
# directory through a hostPath needs runAsUser: 0 in that pod.
USER 65534:65534
ENTRYPOINT ["/opt/vigil/bin/vigil-install"]
CMD ["--help"]
