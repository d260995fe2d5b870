# transferkit in a container. CPU by default:
#   docker build -t transferkit .
# On NVIDIA GPUs, start from an image that already holds CUDA builds of torch and torchvision
# (TAG: a <torch>-cuda<version>-cudnn<version>-runtime tag of pytorch/pytorch on Docker Hub):
#   docker build -t transferkit:cuda --build-arg BASE_IMAGE=pytorch/pytorch:TAG \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CPU wheels of torch by default: PyPI's default torch wheels carry several GB of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRANSFERKIT_DATA_MIRROR=/data

WORKDIR /opt/transferkit
COPY pyproject.toml README.md ./
COPY src ./src
# The project itself is what is installed; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" ".[serve]" \
    && useradd --create-home --uid 1000 transferkit \
    && mkdir -p /data /runs \
    && chown transferkit:transferkit /data /runs

USER 1000
WORKDIR /runs
EXPOSE 8000
ENTRYPOINT ["transferkit"]
CMD ["--help"]
