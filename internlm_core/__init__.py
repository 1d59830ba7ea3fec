"""InternLM v1 on MindSpore: config, model, engine, generation, tokenizer, conversion, training, export."""
import os

# MindSpore 2.9's own protobuf modules crash (at exit, GIL errors) under protobuf's C++/upb
# runtime; the pure-Python runtime works. It must be chosen before protobuf is first imported.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
