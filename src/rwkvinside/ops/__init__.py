"""Numeric kernels: the WKV-7 recurrence and its fast paths; decoding attention over a masked KV cache
(`ops.decode_attention`, for sampling the teacher)."""

from rwkvinside.ops.wkv7 import wkv7

__all__ = ["wkv7"]
