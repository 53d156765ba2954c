# CPU image of HaNoRec Studio: the package, its pinned dependencies and the bundled demo data.
# (Real MovieLens data is never copied in: mount ../shared/data at run time if you have it.)
#   docker build -t hanorec-studio .
#   docker run --rm hanorec-studio python -m hanorec run --config configs/tiny-cpu.yaml
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
WORKDIR /app

# torch first with an exact pin, so the CPU build is used and nothing else pulls a CUDA one
COPY requirements.txt ./
RUN pip install torch==2.13.0 && pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY hanorec ./hanorec
COPY configs ./configs
COPY assets ./assets
RUN pip install --no-deps -e .

CMD ["python", "-m", "hanorec", "run", "--config", "configs/tiny-cpu.yaml"]
