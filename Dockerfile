# tusserver in a container. docker-compose.yml runs two of them with a Redis, behind nginx.
FROM python:3.12-slim
RUN useradd --create-home --uid 10001 tus
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tusserver ./tusserver
RUN pip install --no-cache-dir . && mkdir /data && chown tus:tus /data
USER tus
EXPOSE 1080
ENTRYPOINT ["tusserver"]
CMD ["--host", "0.0.0.0", "--data-dir", "/data"]
