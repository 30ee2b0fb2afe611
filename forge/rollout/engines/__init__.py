"""Inference engines: the protocol, the transformers engine, its KV cache layer and the
batching front; import each from its own module."""
