"""Recurrent generation: load a student (checkpoint or exported folder), generate, chat.

Each converted layer carries a fixed-size state between tokens (`rwkvinside.modeling.state`), so a
new token costs it the same at any context length; `generate` is transformers' own.
"""
