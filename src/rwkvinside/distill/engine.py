"""Engines: who owns the optimizer, gradient accumulation, clipping and the process group.

`PlainEngine` is one process on the CPU or one GPU and needs nothing beyond torch.
`DeepSpeedEngine` runs under a `deepspeed`/`torchrun` launch (ZeRO 0-3, bf16, CPU offload).
The training loop talks to both through the same few methods. This is the only module that
reads RANK/LOCAL_RANK/WORLD_SIZE or imports deepspeed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rwkvinside.config import EngineConfig, TrainConfig
from rwkvinside.distill.checkpoint import save_torch
from rwkvinside.errors import UserError

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


def launched_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as set by deepspeed/torchrun; (0, 0, 1) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def resolve_device(train: TrainConfig, local_rank: int = 0) -> torch.device:
    if train.device != "auto":
        return torch.device(train.device)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    if train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[train.dtype]


def param_groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """Weight decay applies to matrices only, not to vectors (norms, biases, mixing vectors)."""
    matrices = [p for p in params if p.ndim >= 2]
    vectors = [p for p in params if p.ndim < 2]
    return [{"params": matrices, "decays": True}, {"params": vectors, "decays": False, "weight_decay": 0.0}]


def make_optimizer(params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(params), lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPS,
                             fused=device.type == "cuda")


class Engine:
    """The interface the loop uses: backward(loss) for every micro-batch, optimizer_step() once
    per optimizer step. Subclasses own an optimizer over the trainable parameters."""

    rank = 0
    world_size = 1
    skips_nonfinite_steps = True  # False: a non-finite gradient may already have been applied
    device: torch.device
    optimizer: torch.optim.Optimizer

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def set_schedule(self, lr: float, weight_decay: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = weight_decay if group.get("decays", True) else 0.0

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        return value

    def barrier(self) -> None:
        pass

    def whole_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The state dict of `model.model` (the student's language model) for the main process to
        save, where the model's own tensors are not whole; None where they are. Every process
        calls it: gathering may be collective."""
        return None


class PlainEngine(Engine):
    """One process: torch AdamW, accumulation by loss scaling, global-norm clipping."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], train: TrainConfig, device: torch.device):
        self.model = model
        self.params = params
        self.device = device
        self.grad_accum = train.grad_accum
        self.grad_clip = train.grad_clip
        self.optimizer = make_optimizer(params, device)

    def backward(self, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()

    def optimizer_step(self, skip: bool = False) -> float:
        """Clip, step and zero the gradients; returns the gradient norm before clipping. With `skip`
        (a non-finite loss in this step) neither the weights nor the optimizer state change."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        if torch.isfinite(norm) and not skip:  # a non-finite gradient never reaches the weights
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def save(self, folder: Path, trainable: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, folder / "trainable.safetensors")
        save_torch(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, model: nn.Module) -> None:
        from safetensors.torch import load_file

        state = load_file(folder / "trainable.safetensors", device=str(self.device))
        missing = set(state) - set(dict(model.named_parameters()))
        if missing:
            raise UserError(f"checkpoint {folder} holds unknown parameters (e.g. {sorted(missing)[0]}); "
                            "it was written by a different conversion; resume with the same config")
        model.load_state_dict(state, strict=False)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))


class DeepSpeedEngine(Engine):
    """DeepSpeed: ZeRO 0-3 over NCCL (GPU) or gloo (CPU), bf16 on GPU, optional CPU offload."""

    skips_nonfinite_steps = False

    def __init__(self, model: nn.Module, params: list[nn.Parameter], train: TrainConfig,
                 engine: EngineConfig, device: torch.device, dtype: torch.dtype):
        try:
            import deepspeed
        except ImportError:
            raise UserError("engine.kind=deepspeed needs DeepSpeed: pip install 'rwkvinside[deepspeed]'") from None
        self.rank, _, self.world_size = launched_world()
        self.device = device
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        config = deepspeed_config(train, engine, dtype)
        if offloads_optimizer(config):
            # The optimizer steps on the CPU, where torch's AdamW would be the bottleneck (and
            # DeepSpeed refuses it): DeepSpeed's vectorised CPU Adam, in AdamW mode, built on first use.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(param_groups(params), lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPS,
                                         adamw_mode=True)
        else:
            optimizer = make_optimizer(params, device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, model_parameters=None)
        self.params = params
        self._norm: float | None = None  # measured here where DeepSpeed does not report it (ZeRO 0)

    def backward(self, loss: Tensor) -> None:
        # DeepSpeed scales by the accumulation steps itself, and its step() must follow every
        # micro-batch's backward: it steps the optimizer only at the accumulation boundary.
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        if boundary and self.engine.zero_optimization_stage() == 0:
            # the gradients are averaged over the ranks now, and step() clears them
            grads = [p.grad for p in self.params if p.grad is not None]
            self._norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()

    def optimizer_step(self, skip: bool = False) -> float:
        """The optimizer already stepped in the boundary micro-batch's backward() (for a skipped
        step with learning rate and weight decay 0, see Trainer.step); report the norm."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._norm
        return float(norm) if norm is not None else float("nan")

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        dist.barrier()

    def whole_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        """Under ZeRO-3 each process holds a slice of every weight: gather them, one module at a
        time, onto the main process's CPU (None on the others)."""
        if self.engine.zero_optimization_stage() < 3:
            return None
        state = self.engine._zero3_consolidated_16bit_state_dict()  # the weights in the model's dtype
        if state is None:
            return None
        return {name.removeprefix("model."): tensor for name, tensor in state.items() if name.startswith("model.")}

    def save(self, folder: Path, trainable: dict[str, Tensor]) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path, model: nn.Module) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False)
        if path is None:
            raise UserError(f"no DeepSpeed state in {folder}; it was written by another engine")


def leave_process_group() -> None:
    """At the end of a run, also after an error: a process that exits without destroying its process
    group may abort. Once per process: the group serves every stage (a second init_process_group
    under the same launch fails to connect). No barrier: after an error the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_config(train: TrainConfig, engine: EngineConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Our settings as a DeepSpeed config; a user JSON (engine.deepspeed_config) overrides them."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if engine.deepspeed_config:
        config = _merge(config, read_deepspeed_json(engine.deepspeed_config))
    return config


def offloads_optimizer(config: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config (ours, or ours with the user's JSON on top) offloads the optimizer."""
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


def read_deepspeed_json(path: str) -> dict[str, Any]:
    """A user's DeepSpeed config file, or a UserError that says what is wrong with it."""
    path = Path(path)
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config '{path}' does not exist; fix engine.deepspeed_config") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"DeepSpeed config '{path}' is not valid JSON ({error}); fix the file") from None
    if not isinstance(user, dict):
        raise UserError(f"DeepSpeed config '{path}' must hold a JSON object, not {type(user).__name__}")
    return user


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged
