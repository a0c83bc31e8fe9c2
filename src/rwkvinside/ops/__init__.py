"""Numeric kernels: the WKV-7 recurrence and its fast paths."""

from rwkvinside.ops.wkv7 import wkv7

__all__ = ["wkv7"]
