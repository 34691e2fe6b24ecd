# gan-pipeline on a CUDA runtime. The pinned torch wheels bring their own CUDA libraries; the
# base image supplies the driver-facing runtime. Every Python dependency is pinned by
# constraints.txt, the same file CI installs from.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# GLIBC_TUNABLES: data-loading processes keep freed memory mapped instead of faulting it in
# again for every sample (measured in docs/data.md).
ENV DEBIAN_FRONTEND=noninteractive \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/gan-pipeline
COPY pyproject.toml README.md constraints.txt ./
COPY pipeline ./pipeline
# Before the install: pipeline/configs links to it, and the wheel carries the configs.
COPY configs ./configs
RUN pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-build-isolation -c constraints.txt deepspeed
COPY launch ./launch

RUN useradd --create-home --uid 1000 gan
USER 1000:1000
WORKDIR /home/gan

ENTRYPOINT ["/opt/gan-pipeline/launch/docker-entrypoint.sh"]
CMD ["help"]
