# gan-pipeline on a CUDA runtime. The torch wheels pinned in pyproject.toml bring their own CUDA
# libraries, so the base only needs the driver-facing runtime and Python.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/gan-pipeline
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip install --upgrade pip && pip install .
COPY launch ./launch
COPY configs ./configs

RUN useradd --create-home --uid 1000 gan
USER gan
WORKDIR /home/gan

ENTRYPOINT ["python3", "/opt/gan-pipeline/launch/shard.py"]
CMD ["--help"]
