"""Long jobs (convert, preprocess, fine-tune, export) on Celery with Redis, and their gRPC API."""
