# The node and worker image. Installs exactly as scripts/setup does: a venv at /app/.venv with
# the project installed into it.
FROM python:3.11-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY scripts ./scripts
COPY dicom_node ./dicom_node
COPY workers ./workers
COPY training ./training
COPY migrations ./migrations
RUN scripts/setup
ENV PATH=/app/.venv/bin:$PATH \
    SPINENODE_DATA_DIR=/var/lib/spinenode
EXPOSE 11112
CMD ["spinenode", "serve"]
