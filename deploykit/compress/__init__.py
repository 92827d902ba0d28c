"""Compression of a user's trained network under a latency budget: structured pruning, trained low-rank
decomposition, INT8 mixed-precision quantization, each followed by verification on the device."""
