"""One optimizer step as a CUDA graph: captured once, then replayed every step.

A small model's training step is bound by the host, not the GPU: on an H200 stage 2 of SmolLM2-135M
spent 265 ms of Python and kernel launches on 139 ms of GPU work (BENCHMARKS.md). A captured graph
launches the same kernels again with no Python in between.

What capture asks of the step, and how the step meets it:
- nothing read back to the host: the engine skips a non-finite step on the device, and the loop
  reads the step's record once, after the replay;
- fixed shapes and addresses: each micro-batch is copied into a static input of the captured
  shape; a batch of another shape runs eagerly;
- every tensor made before capture and used by it lives as long as the graph: the weights, their
  float32 masters and gradients, the optimizer's state, the learning rates and the weight decay
  are allocated once and updated in place (PlainEngine);
- every kernel compiled and tuned before capture: the first WARMUP_STEPS steps run eagerly, on the
  stream that captures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from rwkvinside.graph_capture import capturing

logger = logging.getLogger(__name__)

Batches = list[dict[str, Tensor]]
StepOnDevice = Callable[[Batches], dict[str, Tensor]]  # micro-batches -> the step's record, on the device

# Eager steps before capture: the first compiles and tunes the kernels; the second runs them all warm
# (lazily built state, such as the optimizer's, exists by then).
WARMUP_STEPS = 2


def shapes(batches: Batches) -> list[dict[str, tuple]]:
    return [{key: (tuple(x.shape), x.dtype) for key, x in batch.items()} for batch in batches]


class CapturedStep:
    """`step(batches)`, replayed from a CUDA graph once warmed up.

    The record it returns is the graph's output: read it before the next call overwrites it.
    discard: forgets a step begun but not run (called when capture fails; the step then runs eagerly
    from here on, with a warning).
    """

    def __init__(self, step: StepOnDevice, discard: Callable[[], None], warmup: int = WARMUP_STEPS):
        self.step = step
        self.discard = discard
        self.warmup = warmup
        self.stream: torch.cuda.Stream | None = None  # made on first use, on the current device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Batches = []
        self.input_shapes: list[dict[str, tuple]] = []  # shapes(self.inputs), what a replay takes
        self.outputs: dict[str, Tensor] = {}
        self.failed = False
        self.replays = 0

    def __call__(self, batches: Batches) -> dict[str, Tensor]:
        if self.graph is not None and shapes(batches) == self.input_shapes:
            return self._replay(batches)
        if self.graph is not None or self.failed:
            return self.step(batches)
        if self.warmup > 0:
            self.warmup -= 1
            return self._on_capture_stream(batches)
        if self._capture(batches):
            return self._replay(batches)
        return self.step(batches)

    def release(self) -> None:
        """Give the graph and its memory back (the stage's activations live in it); a later call
        captures again."""
        self.graph, self.inputs, self.input_shapes, self.outputs = None, [], [], {}

    def _on_capture_stream(self, batches: Batches) -> dict[str, Tensor]:
        """An eager step on the stream that will capture: some libraries set up per-stream state on
        first use, which must not happen during capture."""
        self.stream = self.stream or torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            outputs = self.step(batches)
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def _capture(self, batches: Batches) -> bool:
        self.stream = self.stream or torch.cuda.Stream()
        self.inputs = [{key: x.clone() for key, x in batch.items()} for batch in batches]
        self.input_shapes = shapes(self.inputs)
        graph = torch.cuda.CUDAGraph()
        started = time.monotonic()
        try:
            with capturing(graph, stream=self.stream, capture_error_mode="thread_local"):
                outputs = self.step(self.inputs)
        except RuntimeError as error:
            logger.warning("capturing the training step in a CUDA graph failed (%s); the steps run eagerly "
                           "(train.cuda_graph=false says so up front)", str(error).splitlines()[0])
            self.discard()
            self.failed, self.inputs, self.input_shapes = True, [], []
            return False
        self.graph, self.outputs = graph, outputs
        logger.info("training step captured in a CUDA graph (%.1f s); replaying it from now on",
                    time.monotonic() - started)
        return True

    def _replay(self, batches: Batches) -> dict[str, Tensor]:
        for static, batch in zip(self.inputs, batches, strict=True):
            for key, x in static.items():
                x.copy_(batch[key], non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.outputs
