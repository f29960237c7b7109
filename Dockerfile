# Timed record attempts: build once, then run with the repository mounted at /speedrun, e.g.
#   docker build -t speedrun .
#   docker run --gpus all --ipc=host --rm -v "$PWD":/speedrun speedrun python data/cached_fineweb10B.py 9
#   docker run --gpus all --ipc=host --rm -v "$PWD":/speedrun speedrun ./run.sh
# Versions are pinned so that a record's log can be reproduced later.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH

RUN pip install torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt numpy==2.4.6 huggingface_hub==2.4.0 tqdm==4.70.1 tiktoken==0.14.0 \
    scipy==1.17.1 matplotlib==3.11.2 safetensors==0.8.0 pytest==9.0.3

WORKDIR /speedrun
CMD ["./run.sh"]
