# syntax=docker/dockerfile:1
# The ollama-corral image: `corral worker`, `corral flower`, `corral exporter` and the CLI.
# Build: docker build -t ollama-corral .   (docker-compose.yml builds it for you)

# -- build: install the project and its dependencies into a virtualenv --------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/corral
WORKDIR /src
COPY . .
RUN /opt/corral/bin/pip install . \
 && find /opt/corral -name '__pycache__' -prune -exec rm -rf {} +

# -- runtime: the virtualenv only, run as an unprivileged user ----------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="ollama-corral" \
      org.opencontainers.image.description="Queue-backed Celery workers in front of Ollama"
RUN groupadd --system --gid 10001 corral \
 && useradd --system --uid 10001 --gid corral --home-dir /home/corral --create-home corral
COPY --from=build /opt/corral /opt/corral
ENV PATH=/opt/corral/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER corral:corral
WORKDIR /home/corral
# Each service names its command (see docker-compose.yml); alone, the image prints the help.
CMD ["corral", "--help"]
