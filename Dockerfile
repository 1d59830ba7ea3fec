# One image for every part of the stack; compose.yaml picks the part with its command
# (the same commands services/launcher.py runs locally).
FROM python:3.11-slim

# libgomp: MindSpore's CPU kernels use OpenMP. g++: the inference worker builds the serving
# kernels (internlm_core/kernels.cc) for the CPU it runs on, once, at start-up.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml ./
COPY internlm_core ./internlm_core
COPY services ./services
COPY proto ./proto
RUN pip install --no-cache-dir -e ".[build]" \
    && python -m services.gen_protos --check

# Listen on all interfaces inside the container; workers register their container address.
ENV INTERNLM_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1

# The endpoint's gRPC and HTTP ports, and the tokenizer's and a worker's (which need INTERNLM_INTERNAL_TOKEN
# when they listen beyond loopback); the metrics ports stay on loopback (INTERNLM_METRICS_HOST).
EXPOSE 50051 8000 50052 50061
CMD ["python", "-m", "services.launcher", "--help"]
