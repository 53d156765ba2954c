# HaNoRec Studio: the explorer app (`python app/main.py`) with the package and the bundled demo data.
#
# GPU image (default; CUDA runtime base, the CUDA build of torch from PyPI):
#   docker build -t hanorec-studio .
#   docker run --gpus all -p 7860:7860 hanorec-studio
# CPU image (slim Python base, the CPU build of torch):
#   docker build --build-arg TARGET=cpu -t hanorec-studio:cpu .
#   docker run -p 7860:7860 hanorec-studio:cpu
# The image binds 0.0.0.0, so a plain `docker run` starts demo mode (HANOREC_DEMO=1: the caps a shared
# server needs). Full mode needs a login: the app refuses to serve every interface without one, e.g.
#   docker run -p 7860:7860 -e HANOREC_DEMO=0 -e HANOREC_AUTH=me:a-long-password hanorec-studio
# (docs/space.md: demo mode, login, ownership of jobs, per-visitor limits).
# Data from outside the repo is never copied in: mount it and name it, e.g.
#   docker run -p 7860:7860 -v /path/to/movielens:/data:ro hanorec-studio python app/main.py --data /data
ARG TARGET=gpu

# ---- bases --------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS base-gpu
# Python 3.11 (the version the pins were tested on) from the deadsnakes archive; apt versions there move,
# so they are not pinned (the Python packages are)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*
# torchvision is normal on GPU hosts (real Qwen2.5-VL processors use it); the CPU image does without
ENV TORCH_INDEX=https://pypi.org/simple EXTRA_TORCH_PACKAGES="torchvision==0.28.0"

FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu EXTRA_TORCH_PACKAGES=""

# ---- the image ----------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${TARGET}
# (TOKENIZERS_PARALLELISM is a switch, not a secret)
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    GRADIO_ANALYTICS_ENABLED=False GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 HANOREC_DEMO=1 \
    HOME=/home/user HF_HOME=/home/user/.cache/huggingface \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# a non-root user with uid 1000 (what Hugging Face Spaces expects)
RUN useradd --create-home --uid 1000 --shell /bin/bash user \
    && python3.11 -m venv /opt/venv && chown -R user:user /opt/venv
USER 1000
WORKDIR /home/user/app

# dependencies first (torch with an exact pin, from the index that matches the image), so code edits
# do not reinstall them
COPY --chown=user:user requirements.txt ./
# (EXTRA_TORCH_PACKAGES is a list of packages, split on purpose)
# hadolint ignore=DL3013,SC2086
RUN pip install --upgrade pip \
    && pip install --index-url "$TORCH_INDEX" torch==2.13.0 $EXTRA_TORCH_PACKAGES \
    && pip install -r requirements.txt

# then the code and the bundled demo data (what .dockerignore leaves out never enters the image)
COPY --chown=user:user hanorec ./hanorec
COPY --chown=user:user app ./app
COPY --chown=user:user configs ./configs
COPY --chown=user:user assets ./assets
COPY --chown=user:user pyproject.toml README.md ./

# CPU image: the scores a classroom asks for first (the first 50 demo users' candidate scores and the noise
# lab's default draws, at the default and at demo mode's draw count), computed once here into runs/.cache
# so the app serves them from the first click (app/main.py --warm; BENCHMARKS.md section 7). The GPU image
# skips it: scores are kept per device type, and a GPU computes draws quickly.
ARG TARGET
RUN if [ "$TARGET" = "cpu" ]; then python app/main.py --warm 50 --no-demo && python app/main.py --warm 50 --demo; fi

EXPOSE 7860
CMD ["python", "app/main.py"]
