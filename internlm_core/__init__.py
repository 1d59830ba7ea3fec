"""InternLM v1 on MindSpore: config, model, engine, generation, tokenizer, conversion, training, export."""
import os

# MindSpore 2.9's own protobuf modules crash (at exit, GIL errors) under protobuf's C++/upb
# runtime; the pure-Python runtime works. It must be chosen before protobuf is first imported.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
# The CPU kernels (kernels.cc) run on OpenMP threads beside MindSpore's own; with libgomp's
# default spin-wait a finished kernel's threads keep both cores busy and the next MindSpore op
# waits for them (measured, bench-serve decode step: median 39 ms against a 15 ms minimum).
# Spinning briefly, then sleeping, gives 16 ms. libgomp reads this once, when MindSpore loads it,
# so it must be set before the first ``import mindspore``.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
