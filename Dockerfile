# One image for every refgen service: worker, beat, flower and gateway differ only by command
# (docker-compose.yml). Installed from the pinned constraints, run as an unprivileged user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /app

# Everything the package is built from: its modules, celeryconfig.py, the README it declares as
# its readme, and the gateway's pages (package data of gateway, pyproject.toml).
COPY pyproject.toml constraints.txt README.md celeryconfig.py ./
COPY worker ./worker
COPY tasks ./tasks
COPY gateway ./gateway
COPY examples ./examples
RUN pip install -c constraints.txt . \
    && useradd --create-home --uid 10001 --user-group refgen \
    && mkdir -p /data/storage /data/beat \
    && chown -R refgen:refgen /data

# Named volumes mounted on /data/* start with this ownership, so the user below can write them.
USER refgen
CMD ["refgen", "worker"]
