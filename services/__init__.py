"""The gRPC services and Celery workers around ``internlm_core``."""
import os

# Same reason as in internlm_core/__init__.py: any services process may load MindSpore after
# the generated stubs, and protobuf's runtime is fixed at its first import.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
