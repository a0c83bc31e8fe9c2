"""WKV-7: the state update shared by training and inference (see README.md in this folder)."""

from rwkvinside.ops.wkv7.naive import wkv7_naive

wkv7 = wkv7_naive

__all__ = ["wkv7", "wkv7_naive"]
