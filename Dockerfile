# Two images from one file, each installed as scripts/setup does (a venv at /app/.venv, from a
# lock file with hashes):
#   node    (docker build --target node)    serve --no-worker, web, db upgrade: no torch
#   worker  (docker build --target worker)  the workers: torch, timm, ultralytics
FROM python:3.11-slim-bookworm AS base
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY locks ./locks
COPY scripts ./scripts
COPY dicom_node ./dicom_node
COPY workers ./workers
COPY training ./training
COPY migrations ./migrations
ENV PATH=/app/.venv/bin:$PATH \
    SPINENODE_DATA_DIR=/var/lib/spinenode

FROM base AS worker
# g++: inductor builds the int8 members' kernels (and compile_models' code) on this machine;
# without it int8 members are served in float32.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN scripts/setup --worker
CMD ["spinenode", "worker"]

FROM base AS node
RUN scripts/setup --node
EXPOSE 11112 8080
CMD ["spinenode", "serve", "--no-worker"]
