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
from torch.profiler import record_function

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


def param_groups(params: list[Tensor], lr_scales: list[float]) -> list[dict[str, Any]]:
    """One group per (decays, learning-rate scale): weight decay applies to matrices only, not to vectors
    (norms, biases, mixing vectors); `lr_scales` gives each parameter's share of the stage's rate."""
    groups: dict[tuple[bool, float], list[Tensor]] = {}
    for param, scale in zip(params, lr_scales, strict=True):
        groups.setdefault((param.ndim >= 2, scale), []).append(param)
    return [{"params": group, "decays": decays, "lr_scale": scale, **({} if decays else {"weight_decay": 0.0})}
            for (decays, scale), group in sorted(groups.items(), reverse=True)]


def make_optimizer(params: list[Tensor], lr_scales: list[float],
                   capturable: bool = False) -> torch.optim.Optimizer:
    """torch's fused AdamW (on the CPU too): one kernel for all parameters, and it honours
    `found_inf`, which lets a step be skipped without reading anything back to the host.
    capturable: the step may be captured in a CUDA graph (its step counts stay on the device)."""
    return torch.optim.AdamW(param_groups(params, lr_scales), lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True,
                             capturable=capturable)


class Engine:
    """What the loop uses: `backward(loss)` for every micro-batch, then `finish_step()` once per
    optimizer step, which clips, steps (or skips a step whose loss or gradient is not finite) and
    says what it did. Subclasses own the optimizer over the trainable parameters."""

    rank = 0
    world_size = 1
    device: torch.device
    optimizer: torch.optim.Optimizer

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def capturable(self) -> bool:
        """Whether a step (backward() calls and finish_step) can be captured in a CUDA graph."""
        return False

    def set_schedule(self, lr: float, weight_decay: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = weight_decay if group.get("decays", True) else 0.0

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        return value

    def barrier(self) -> None:
        pass

    def whole_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The student's state dict for the main process to save, where the model's own tensors are
        not whole; None where they are. Every process calls it: gathering may be collective."""
        return None


class PlainEngine(Engine):
    """One process: AdamW over float32 master weights, accumulation by loss scaling, clipping.

    A bf16 weight keeps 8 bits of mantissa: an update below half its spacing (about 0.4% of the
    weight) rounds away, which at stage 2's learning rates is most of them. So the optimizer steps a
    float32 copy of every trained parameter that is not float32 already, and each step writes the
    copy back into the model's weight; the model computes in its own dtype. Float32 parameters are
    their own master weights.

    A step can be captured in a CUDA graph and replayed (distill/cuda_graph.py): nothing in it reads
    back to the host, and every tensor it keeps from step to step (master weights and their
    gradients, the optimizer's state, the learning rates and the weight decay) is allocated once and
    updated in place. So the schedule lives in device tensors, and the decoupled weight decay, which
    fused AdamW takes only as a number, is applied here, as AdamW would apply it.
    """

    def __init__(self, trainable: dict[str, nn.Parameter], train: TrainConfig, device: torch.device,
                 lr_scales: dict[str, float] | None = None):
        self.trainable = trainable
        self.device = device
        self.grad_accum = train.grad_accum
        self.grad_clip = train.grad_clip
        self.params = list(trainable.values())
        self.masters = [p if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        # The parameters that have a copy of their own, and those copies with their gradients.
        self.copied = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        self.master_grads = [torch.zeros_like(m) for _, m in self.copied]
        self.own_masters = [p for p, m in zip(self.params, self.masters) if m is p]
        scales = [1.0 if lr_scales is None else lr_scales[name] for name in trainable]
        self.optimizer = make_optimizer(self.masters, scales, capturable=self.capturable)
        self._schedule_in_tensors()
        self.weight_decay = torch.zeros((), device=device)
        self._losses_finite = torch.ones((), dtype=torch.bool, device=device)

    @property
    def capturable(self) -> bool:
        return self.device.type == "cuda"

    def _schedule_in_tensors(self) -> None:
        """Each group's learning rate as a float32 device tensor (fused AdamW reads it there), and no
        weight decay inside AdamW (finish_step applies it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=self.device).clone()
            group["weight_decay"] = 0.0

    def set_schedule(self, lr: float, weight_decay: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr * group["lr_scale"])
        self.weight_decay.fill_(weight_decay)

    def backward(self, loss: Tensor) -> None:
        self._losses_finite &= torch.isfinite(loss.detach())
        (loss / self.grad_accum).backward()

    @record_function("optimizer")
    def finish_step(self) -> tuple[Tensor, Tensor]:
        """Clip, decay and step; returns (gradient norm before clipping, whether the step was applied),
        both on the device. A step with a non-finite loss or gradient changes neither the weights nor
        the optimizer state: fused AdamW skips itself on `found_inf`, the decay multiplies by 1."""
        self._gradients_to_masters()
        stepped = [m for m in self.masters if m.grad is not None]
        norm = (torch.nn.utils.get_total_norm([m.grad for m in stepped]) if stepped
                else torch.zeros((), device=self.device))
        applied = torch.isfinite(norm) & self._losses_finite
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(stepped, self.grad_clip, norm)
        self._decay_weights(applied)
        self.optimizer.found_inf = (~applied).float()
        self.optimizer.step()
        if self.copied:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in self.copied], [m for _, m in self.copied])
        for param in self.own_masters:  # a copy's gradient stays, to be overwritten next step
            param.grad = None
        self._losses_finite.fill_(True)
        return norm, applied

    @torch.no_grad()
    def _decay_weights(self, applied: Tensor) -> None:
        """AdamW's decoupled weight decay, w <- w (1 - lr wd), on the matrices that step: AdamW applies
        it just before its update, to the parameters that have a gradient."""
        for group in self.optimizer.param_groups:
            decayed = [p for p in group["params"] if p.grad is not None] if group["decays"] else []
            if decayed:
                factor = torch.where(applied, 1 - group["lr"] * self.weight_decay, 1.0)
                torch._foreach_mul_(decayed, factor)

    def _gradients_to_masters(self) -> None:
        """Each copied parameter's gradient into its master's float32 gradient, allocated once: one
        multi-tensor copy, not one conversion (and allocation) per parameter, which on a GPU costs
        the host more time than the kernels take. A parameter without a gradient this step leaves its
        master without one too (the optimizer then skips it)."""
        kept, sources = [], []
        for (param, master), buffer in zip(self.copied, self.master_grads):
            if param.grad is None:
                master.grad = None
            else:
                master.grad = buffer
                kept.append(buffer)
                sources.append(param.grad)
            param.grad = None
        if kept:
            torch._foreach_copy_(kept, sources)

    def discard_step(self) -> None:
        """Forget a step begun but never run (a capture that failed): its gradients and finiteness."""
        for param in self.params:
            param.grad = None
        self._losses_finite.fill_(True)

    def save(self, folder: Path) -> None:
        """The master weights (float32: what resuming needs to continue exactly) and the optimizer."""
        from safetensors.torch import save_file

        save_file({name: master.detach().contiguous().cpu() for name, master in zip(self.trainable, self.masters)},
                  folder / "trainable.safetensors")
        save_torch(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(folder / "trainable.safetensors", device=str(self.device))
        if set(state) != set(self.trainable):
            unknown = sorted(set(state) ^ set(self.trainable))[0]
            raise UserError(f"checkpoint {folder} does not hold the trained parameters of this stage (e.g. "
                            f"{unknown}); it was written by a different conversion; resume with the same config")
        with torch.no_grad():
            for name, param, master in zip(self.trainable, self.params, self.masters):
                master.copy_(state[name])
                if master is not param:
                    param.copy_(master)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        self._schedule_in_tensors()  # a checkpoint's groups replace ours


class DeepSpeedEngine(Engine):
    """DeepSpeed: ZeRO 0-3 over NCCL (GPU) or gloo (CPU), bf16 on GPU (with DeepSpeed's own float32
    master weights), optional CPU offload."""

    def __init__(self, model: nn.Module, trainable: dict[str, nn.Parameter], train: TrainConfig,
                 engine: EngineConfig, device: torch.device, dtype: torch.dtype,
                 lr_scales: dict[str, float] | None = None):
        try:
            import deepspeed
        except ImportError:
            raise UserError("engine.kind=deepspeed needs DeepSpeed: pip install 'rwkvinside[deepspeed]'") from None
        self.rank, _, self.world_size = launched_world()
        self.device = device
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        config = deepspeed_config(train, engine, dtype)
        params = list(trainable.values())
        scales = [1.0 if lr_scales is None else lr_scales[name] for name in trainable]
        if offloads_optimizer(config):
            # The optimizer steps on the CPU, where torch's AdamW would be the bottleneck (and
            # DeepSpeed refuses it): DeepSpeed's vectorised CPU Adam, in AdamW mode, built on first use.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(param_groups(params, scales), lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPS,
                                         adamw_mode=True)
        else:
            optimizer = make_optimizer(params, scales)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, model_parameters=None)
        self.params = params
        self._norm: Tensor | None = None  # measured here where DeepSpeed does not report it (ZeRO 0)
        self._skipping = False

    def backward(self, loss: Tensor) -> None:
        """DeepSpeed steps inside the boundary micro-batch's step(), before finish_step: whether this
        optimizer step may apply must be known then, on every process alike. A step with a non-finite
        loss anywhere runs with learning rate and weight decay 0 and back-propagates an exact zero
        that touches every parameter (keeping the processes' collectives in step) instead."""
        finite = bool(self.all_reduce_sum(torch.isfinite(loss.detach()).float()) == self.world_size)
        if not finite and not self._skipping:
            self._skipping = True
            self.set_schedule(0.0, 0.0)
        # DeepSpeed scales by the accumulation steps itself, and its step() must follow every
        # micro-batch's backward: it steps the optimizer only at the accumulation boundary.
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss if finite else sum(p.sum() for p in self.params) * 0.0)
        if boundary and self.engine.zero_optimization_stage() == 0:
            # the gradients are averaged over the ranks now, and step() clears them
            grads = [p.grad for p in self.params if p.grad is not None]
            self._norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        self.engine.step()

    def finish_step(self) -> tuple[Tensor, Tensor]:
        """The optimizer stepped in the boundary micro-batch's backward(); report the norm and whether
        the step applied. A non-finite gradient from finite losses has been applied by then, so the
        weights cannot be trusted: that ends the run."""
        norm = self.engine.get_global_grad_norm()
        norm = self._norm if norm is None else torch.as_tensor(norm, dtype=torch.float32, device=self.device)
        norm = torch.full((), float("nan"), device=self.device) if norm is None else norm
        applied = not self._skipping
        self._skipping = False
        if applied and not torch.isfinite(norm):
            raise UserError("the gradient norm was NaN/inf and DeepSpeed applied the step; resume from "
                            "the last checkpoint with a lower learning rate")
        return norm, torch.tensor(applied, device=self.device)

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
        return self.engine._zero3_consolidated_16bit_state_dict()  # the weights in the model's dtype

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False)
        if path is None:
            raise UserError(f"no DeepSpeed state in {folder}; it was written by another engine")


def make_engine(model: nn.Module, trainable: dict[str, nn.Parameter], train: TrainConfig, engine: EngineConfig,
                device: torch.device, dtype: torch.dtype, lr_scales: dict[str, float] | None = None) -> Engine:
    """The configured engine over `trainable`; lr_scales: each parameter's share of the learning rate."""
    if engine.kind == "deepspeed":
        return DeepSpeedEngine(model, trainable, train, engine, device, dtype, lr_scales)
    return PlainEngine(trainable, train, device, lr_scales)


def join_process_group(engine: EngineConfig, device: torch.device) -> None:
    """Under a DeepSpeed launch, join the launch's process group now (DeepSpeed would when its engine
    is built), so that work before the first engine, such as stage 1's calibration, can average over
    the processes."""
    if engine.kind == "deepspeed" and not dist.is_initialized():
        try:
            import deepspeed
        except ImportError:
            raise UserError("engine.kind=deepspeed needs DeepSpeed: pip install 'rwkvinside[deepspeed]'") from None
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def sum_over_processes(values: Tensor) -> Tensor:
    """The sum of `values` over the processes of a launch; the values themselves in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values


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
