# syntax=docker/dockerfile:1
# The pipeline image: every stage is a verb of the `aigc` entry point (aigc/cli.py), so one image serves
# the init job, the gatekeeper, the renderers and the assembler (see docker-compose.yml).
#
#   docker build -t aigc-pipeline:local .
#   docker run --rm aigc-pipeline:local --help
#
# torch from PyPI is the CUDA build: the same image renders on the CPU, or on an NVIDIA GPU when the
# container is given one (NVIDIA Container Toolkit; the host driver must support the CUDA version of the
# torch wheels pinned in requirements.lock).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# opencv-python (video assembly) loads libGL and GLib even when no window is ever opened.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, from the lock alone, so editing the code does not reinstall torch.
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.lock

# The project itself, without touching the pinned dependencies.
COPY . /src
RUN pip install --no-cache-dir --no-deps /src

# A non-root user that owns the working folder (AIGC_HOME; faust's data folder lands here too) and /models,
# the mount point of the compose `models` volume (a new named volume takes this owner).
RUN useradd --create-home --uid 10001 --user-group aigc \
    && mkdir -p /var/lib/aigc /models \
    && chown aigc:aigc /var/lib/aigc /models
USER aigc
WORKDIR /var/lib/aigc
ENV AIGC_HOME=/var/lib/aigc

ENTRYPOINT ["aigc"]
CMD ["--help"]
