"""Generated gRPC stubs for internlm.v1 (python -m services.gen_protos); do not edit."""
