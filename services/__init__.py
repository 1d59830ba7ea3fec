"""The gRPC services and Celery workers around ``internlm_core``."""
# internlm_core's package init chooses protobuf's pure-Python runtime (MindSpore's own protobuf
# modules need it) and libgomp's spin; both are read once, at the first import of protobuf or
# MindSpore, and any services process may import the generated stubs before MindSpore.
import internlm_core  # noqa: F401
