# The image holds the code it was built from, with pinned versions, so that a record's log can be
# reproduced later. Data and logs live in mounted folders (README, "Docker"):
#   docker build -t speedrun .
#   docker run --rm -v "$PWD/data/fineweb10B":/speedrun/data/fineweb10B speedrun python data/cached_fineweb10B.py 5
#   docker run --gpus all --ipc=host --rm -v "$PWD/data/fineweb10B":/speedrun/data/fineweb10B -v "$PWD/logs":/speedrun/logs speedrun
# With edited code: add -v "$PWD":/speedrun (the mount replaces the code baked in the image).
# BASE: CI's container check (tools/container_check.py) builds on a local Debian; records use the CUDA image.
ARG BASE=nvidia/cuda:13.0.0-devel-ubuntu24.04
FROM ${BASE}

# SPEEDRUN_IMAGE tells run.sh that it runs in this image (its data hint names the docker command).
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SPEEDRUN_IMAGE=1
# g++: torch.compile's CPU code and Triton's launcher are compiled on the machine.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv g++ git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH

# PyPI's torch 2.11.0 for Linux x86-64 is the CUDA 13.0 build (torch.version.cuda == "13.0").
RUN pip install torch==2.11.0
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt numpy==2.4.6 huggingface_hub==2.4.0 tqdm==4.70.1 tiktoken==0.14.0 \
    scipy==1.17.1 matplotlib==3.11.2 safetensors==0.8.0 pytest==9.0.3

# Last, so that a code change rebuilds only this layer (see .dockerignore for what stays out).
WORKDIR /speedrun
COPY . .
CMD ["./run.sh"]
