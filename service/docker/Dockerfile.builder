# The one-shot `builder`: trains, exports and archives the default models into the model_store volume
# (cnnserve bootstrap) and writes TorchServe's configuration into the state volume. CPU-only torch.
#
# Build args: PYTHON_BASE_IMAGE (python:3.11-slim), and pip's PIP_NO_INDEX / PIP_FIND_LINKS /
# PIP_EXTRA_INDEX_URL (default: PyTorch's CPU wheel index, for torch==2.13.0+cpu) for builds without an index.
ARG PYTHON_BASE_IMAGE=python:3.11-slim
FROM ${PYTHON_BASE_IMAGE}
ARG PIP_NO_INDEX=0
ARG PIP_FIND_LINKS=
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/cnnserve/bin:$PATH
RUN python3 -m venv /opt/cnnserve
COPY service/docker/requirements/builder.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
# cnnserve itself last (its dependencies are the list above): a source change rebuilds only this layer.
COPY pyproject.toml README.md /tmp/src/
COPY service /tmp/src/service
COPY export /tmp/src/export
RUN pip install --no-cache-dir --no-deps /tmp/src && rm -rf /tmp/src
COPY service/docker/builder/entrypoint.sh /usr/local/lib/cnnserve/entrypoint.sh

# uid 1000 like TorchServe's model-server, so both can write the volumes they share.
RUN useradd --create-home --uid 1000 cnnserve \
    && mkdir -p /srv/cnnserve/model-store /srv/cnnserve/state /srv/cnnserve/build \
    && chown -R cnnserve /srv/cnnserve
USER cnnserve
ENV CNNSERVE_MODEL_STORE=/srv/cnnserve/model-store \
    CNNSERVE_STATE_DIR=/srv/cnnserve/state \
    CNNSERVE_BUILD_DIR=/srv/cnnserve/build \
    CNNSERVE_REVISIONS_DIR=/srv/cnnserve/revisions \
    MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["/usr/local/lib/cnnserve/entrypoint.sh"]
