"""Capturing a CUDA graph so that a capture that fails leaves the process as it was.

`torch.cuda.graph` puts the device's default random generator into capture mode when capture begins
and takes it out when capture ends. Where CUDA refuses an operation inside the capture (a read back
to the host, say), ending the capture raises before the generator is taken out, and from then on
every random draw on the device fails ("Offset increment outside graph capture encountered
unexpectedly"): the sampled tokens of a generate that fell back to eager decoding, a model
initialised later in the process. Both users of CUDA graphs here, the training step and the decoding
step, go on eagerly when capture fails, so they capture through `capturing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, **options) -> Iterator[None]:
    """`torch.cuda.graph(graph, **options)`; where capture fails, the current device's default
    generator is put back as it was before capture (its seed and offset, out of capture mode) and
    the error raised on."""
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    before = generator.clone_state()
    try:
        with torch.cuda.graph(graph, **options):
            yield
    except RuntimeError:
        generator.graphsafe_set_state(before)
        raise
