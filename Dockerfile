# gan-pipeline on the Python that constraints.txt was frozen on (3.11). The pinned torch wheels
# bring their own CUDA libraries, so the image holds one copy of them and no CUDA base image; the
# NVIDIA container toolkit (`docker run --gpus ...`) supplies the driver. Every Python dependency
# is pinned by constraints.txt, the same file CI installs from.
FROM python:3.11.7-slim-bookworm

# GLIBC_TUNABLES: data-loading processes keep freed memory mapped instead of faulting it in
# again for every sample (measured in docs/data.md).
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN python -m venv /opt/venv

WORKDIR /opt/gan-pipeline
COPY pyproject.toml README.md constraints.txt ./
COPY pipeline ./pipeline
# Before the install: pipeline/configs links to it, and the wheel carries the configs.
COPY configs ./configs
RUN pip install --no-cache-dir -c constraints.txt ".[s3]" \
 && pip install --no-cache-dir --no-build-isolation -c constraints.txt deepspeed
COPY launch ./launch

RUN useradd --create-home --uid 1000 gan
USER 1000:1000
WORKDIR /home/gan

ENTRYPOINT ["/opt/gan-pipeline/launch/docker-entrypoint.sh"]
CMD ["help"]
