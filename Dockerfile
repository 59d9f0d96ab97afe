# syntax=docker/dockerfile:1
# The `tandem` image: coordinator, inference replica and edge agent alike (the
# command picks the part). CPU by default; the CUDA build for GPU inference:
#   docker build -t tandem:0.1.0 .
#   docker build --build-arg TORCH_VARIANT=cuda -t tandem:0.1.0-cuda .
# Kubernetes probes the gRPC health port, so the image has no HEALTHCHECK.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu: torch from the package index (its Linux wheel is the CPU build);
# cuda: torch from PyTorch's CUDA wheel index, which bundles the CUDA libraries.
ARG TORCH_VARIANT=cpu
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tandem
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services/ services/
RUN case "$TORCH_VARIANT" in \
      cpu) ;; \
      cuda) /opt/tandem/bin/pip install --index-url "$CUDA_TORCH_INDEX" torch==2.13.0 ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac \
 && /opt/tandem/bin/pip install . \
 && find /opt/tandem -name __pycache__ -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
# No compilers and no build context here: the virtual environment only.
RUN groupadd --gid 10001 tandem \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tandem \
 && mkdir -p /var/lib/tandem /var/cache/tandem /etc/tandem/certs \
 && chown 10001:10001 /var/lib/tandem /var/cache/tandem
COPY --from=build /opt/tandem /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TANDEM_CERTS=/etc/tandem/certs
USER 10001:10001
WORKDIR /var/lib/tandem
# coordinator gRPC, health, metrics; replica gRPC, health; agent gRPC, health, metrics
EXPOSE 7443 7444 9100 7450 7451 7460 7461 9101
ENTRYPOINT ["tandem"]
CMD ["--help"]
