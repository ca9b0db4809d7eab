# One image for every refgen service: worker, beat, gateway and flower differ only by command.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md celeryconfig.py ./
COPY worker ./worker
COPY tasks ./tasks
COPY examples ./examples
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --create-home --uid 10001 refgen
USER refgen
CMD ["refgen", "worker"]
