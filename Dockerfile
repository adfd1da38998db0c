# One image for producer and workers. For GPUs build with --build-arg EXTRAS=gpu (CUDA TensorFlow).
FROM python:3.11-slim
ARG EXTRAS=""
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer producer
COPY worker worker
COPY vggish_pipeline vggish_pipeline
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
ENV TF_CPP_MIN_LOG_LEVEL=2
