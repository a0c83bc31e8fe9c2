"""The RWKV-7 ("x070") time mixer: the student that replaces a teacher's softmax attention.

Notation follows ../../../docs (rwkv7.md): x is the hidden state the teacher's attention would
receive (after its input norm), C the hidden size, H heads of size N, C_att = H * N.
Each step below is numbered as in that document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkvinside.ops import wkv7

# log w = -exp(-1/2) * sigmoid(z): the decay per step lies in (exp(-exp(-1/2)), 1) = (0.545, 1).
MAX_LOG_DECAY = math.exp(-0.5)


# The usual LoRA rank for width C is factor * sqrt(C), rounded to a multiple of 32 (at least 32).
LORA_FACTORS = {"decay": 2.5, "iclr": 2.5, "value": 1.7, "gate": 5.0}


def lora_rank(hidden_size: int, factor: float) -> int:
    return max(32, round(factor * math.sqrt(hidden_size) / 32) * 32)


@dataclass(frozen=True)
class TimeMixerConfig:
    """Shape of one time mixer. `layer_id`/`num_layers` only shape the RWKV-7 initialisation."""

    hidden_size: int
    num_heads: int
    head_size: int
    layer_id: int = 0
    num_layers: int = 1
    decay_rank: int | None = None  # None: the RWKV-7 default for the width
    iclr_rank: int | None = None
    value_rank: int | None = None
    gate_rank: int | None = None
    bias: tuple[bool, bool, bool, bool] = (False, False, False, False)  # r, k, v, o projections
    qk_norm_eps: float | None = None  # set for teachers with per-head q/k RMSNorm (Qwen3)
    norm_eps: float | None = None  # ln_x GroupNorm eps; None: head_size * 1e-5
    # Step 5: mix the first converted layer's value (v_first) into this layer's. That layer itself
    # has no value residual: its value is v_first.
    value_residual: bool = False

    @property
    def attention_size(self) -> int:
        return self.num_heads * self.head_size

    def rank(self, name: str) -> int:
        explicit = {"decay": self.decay_rank, "iclr": self.iclr_rank, "value": self.value_rank,
                    "gate": self.gate_rank}[name]
        if explicit is not None:
            return explicit
        return lora_rank(self.hidden_size, LORA_FACTORS[name])


@dataclass
class TimeMixerState:
    """What a time mixer carries between calls: the last input (token shift) and the WKV state."""

    shift: Tensor  # [B, C]
    wkv: Tensor  # [B, H, N, N], float32

    @classmethod
    def zeros(cls, batch: int, config: TimeMixerConfig, device, dtype) -> TimeMixerState:
        return cls(
            shift=torch.zeros(batch, config.hidden_size, device=device, dtype=dtype),
            wkv=torch.zeros(batch, config.num_heads, config.head_size, config.head_size,
                            device=device, dtype=torch.float32),
        )


@dataclass
class MixedInputs:
    """What steps 1-7 make of a layer's input: the six inputs of the state update ([B, T, H, N]:
    r, the log decay w, the replacement key k, v, and a = -removal key, b = removal key * iclr)
    and what steps 9-11 read besides its output."""

    r: Tensor
    w: Tensor
    k: Tensor
    v: Tensor
    a: Tensor
    b: Tensor
    gate: Tensor  # [B, T, C_att]
    v_first: Tensor  # [B, T, C_att]
    last_input: Tensor  # [B, C]: the token shift state a next call starts from

    @property
    def wkv_inputs(self) -> tuple[Tensor, ...]:
        return self.r, self.w, self.k, self.v, self.a, self.b

    def as_tuple(self) -> tuple[Tensor, ...]:
        """The fields in order (`MixedInputs(*t)` rebuilds it): what torch.func.vmap passes through."""
        return tuple(getattr(self, field.name) for field in fields(self))


def stack_parameters(mixers: Sequence[RWKV7TimeMixer]) -> dict[str, Tensor]:
    """Each parameter of same-shaped mixers stacked along a new leading dimension, by name, for
    `RWKV7TimeMixer.mix_stacked`. Differentiable: gradients flow back to every mixer's own."""
    named = [dict(mixer.named_parameters()) for mixer in mixers]
    return {name: torch.stack([parameters[name] for parameters in named]) for name in named[0]}


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's channels (Qwen3's q_norm/k_norm), weight shared by all heads."""

    def __init__(self, head_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # x: [..., H, N]
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # float32 at least; float64 stays
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RWKV7TimeMixer(nn.Module):
    """RWKV-7 time mixing for one layer.

    forward(x, v_first, state) -> (output, v_first, state): the first converted layer
    (value_residual=False) is given v_first=None and returns its own value as v_first; every later
    layer (value_residual=True) is given it and mixes it in (step 5).
    """

    def __init__(self, config: TimeMixerConfig):
        super().__init__()
        self.config = config
        C, A = config.hidden_size, config.attention_size
        r_bias, k_bias, v_bias, o_bias = config.bias

        # Step 1: token-shift interpolation, one vector per branch.
        self.x_r = nn.Parameter(torch.empty(C))
        self.x_w = nn.Parameter(torch.empty(C))
        self.x_k = nn.Parameter(torch.empty(C))
        self.x_v = nn.Parameter(torch.empty(C))
        self.x_a = nn.Parameter(torch.empty(C))
        self.x_g = nn.Parameter(torch.empty(C))
        # Step 2: projections, the ones initialised from the teacher's q/k/v/o.
        self.receptance = nn.Linear(C, A, bias=r_bias)
        self.key = nn.Linear(C, A, bias=k_bias)
        self.value = nn.Linear(C, A, bias=v_bias)
        self.output = nn.Linear(A, C, bias=o_bias)
        # Steps 3-6: decay, in-context learning rate, value residual and gate, as low-rank maps.
        self.w0 = nn.Parameter(torch.empty(A))
        self.w1 = nn.Parameter(torch.empty(C, config.rank("decay")))
        self.w2 = nn.Parameter(torch.empty(config.rank("decay"), A))
        self.a0 = nn.Parameter(torch.empty(A))
        self.a1 = nn.Parameter(torch.empty(C, config.rank("iclr")))
        self.a2 = nn.Parameter(torch.empty(config.rank("iclr"), A))
        if config.value_residual:
            self.v0 = nn.Parameter(torch.empty(A))
            self.v1 = nn.Parameter(torch.empty(C, config.rank("value")))
            self.v2 = nn.Parameter(torch.empty(config.rank("value"), A))
        self.g1 = nn.Parameter(torch.empty(C, config.rank("gate")))
        self.g2 = nn.Parameter(torch.empty(config.rank("gate"), A))
        # Step 7: removal-key scale and replacement-key mixing; step 10: bonus.
        self.k_k = nn.Parameter(torch.empty(A))
        self.k_a = nn.Parameter(torch.empty(A))
        self.r_k = nn.Parameter(torch.empty(config.num_heads, config.head_size))
        # Step 9.
        eps = config.norm_eps if config.norm_eps is not None else config.head_size * 1e-5
        self.ln_x = nn.GroupNorm(config.num_heads, A, eps=eps)
        if config.qk_norm_eps is not None:
            self.r_norm = HeadRMSNorm(config.head_size, config.qk_norm_eps)
            self.k_norm = HeadRMSNorm(config.head_size, config.qk_norm_eps)
        else:
            self.r_norm = self.k_norm = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The RWKV-7 initialisation (RWKV-LM x070), layer-dependent through layer_id."""
        cfg = self.config
        C, A, N = cfg.hidden_size, cfg.attention_size, cfg.head_size
        ratio_0_to_1 = cfg.layer_id / max(cfg.num_layers - 1, 1)
        ratio_1_to_almost_0 = 1.0 - cfg.layer_id / cfg.num_layers
        ddd = torch.arange(C, dtype=torch.float32) / C
        for name, power in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2)):
            getattr(self, f"x_{name}").copy_(1.0 - ddd.pow(power * ratio_1_to_almost_0))

        n = torch.arange(A, dtype=torch.float32)
        linear = n / max(A - 1, 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        decay_speed = -6 + 6 * (n / max(A - 1, 1)).pow(1 + ratio_0_to_1**0.3)
        self.w0.copy_(decay_speed + 0.5 + zigzag * 2.5)
        self.a0.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        if cfg.value_residual:
            self.v0.copy_(0.73 - linear * 0.4)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        low_rank = [(self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)]
        if cfg.value_residual:
            low_rank.append((self.v1, self.v2))
        for first, second in low_rank:
            first.zero_()
            nn.init.orthogonal_(second, gain=0.1)

        nn.init.uniform_(self.receptance.weight, -0.5 / math.sqrt(C), 0.5 / math.sqrt(C))
        nn.init.uniform_(self.key.weight, -0.05 / math.sqrt(C), 0.05 / math.sqrt(C))
        nn.init.uniform_(self.value.weight, -0.5 / math.sqrt(C), 0.5 / math.sqrt(C))
        nn.init.zeros_(self.output.weight)
        for proj in (self.receptance, self.key, self.value, self.output):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.ones_(self.ln_x.weight)
        nn.init.zeros_(self.ln_x.bias)
        for norm in (self.r_norm, self.k_norm):
            if norm is not None:
                nn.init.ones_(norm.weight)

    def compile_around_state_update(self, **options) -> None:
        """torch.compile steps 1-7 (`mix`) and 9-11 (`readout`), not the state update between them;
        and the same for several mixers at once (`mix_stacked`, `readout_stacked`: stage 1).

        Around the state update a layer runs some fifty small elementwise kernels per call, forward
        and backward; compiled, they fuse into a handful, which saves both their launches (the host
        cannot keep the GPU busy otherwise) and their memory traffic. The state update stays fla's own
        Triton kernels, called eagerly. `options` go to torch.compile. Mixers share their compiled
        code: dynamo compiles each distinct shape once, not each layer.

        The compiled `mix` returns copies of the per-head views, not the views: torch 2.13 replays the
        views of a compiled function's outputs from metadata that is corrupt once a second mixer runs
        the same compiled code (a wrong shape, or a crash). Inside the compiled code the copies fuse
        into the kernels that compute the tensors, all but r's (a projection's output). A second call
        changes nothing.
        """
        if "mix" in vars(self):  # compiled already: the compiled functions shadow the methods
            return
        eager_mix = self.mix

        def mix_without_output_views(*args, **kwargs) -> MixedInputs:
            mixed = eager_mix(*args, **kwargs)
            per_head = {name: getattr(mixed, name).clone() for name in ("r", "w", "k", "v", "a", "b")}
            return MixedInputs(**per_head, gate=mixed.gate, v_first=mixed.v_first, last_input=mixed.last_input)

        self.mix = torch.compile(mix_without_output_views, **options)
        self.readout = torch.compile(self.readout, **options)
        self._mix_each = torch.compile(RWKV7TimeMixer._mix_each, **options)
        self._readout_each = torch.compile(RWKV7TimeMixer._readout_each, **options)

    def forward(
        self,
        x: Tensor,
        v_first: Tensor | None = None,
        state: TimeMixerState | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, TimeMixerState | None]:
        """x: [B, T, C]; v_first: [B, T, C_att] or None (this layer produces it);
        state: carried from the previous call (None: start of sequence, no state returned);
        token_mask: [B, T], 1 for real tokens, 0 for padding (padding leaves the state untouched
        only when it comes first, i.e. left padding in generation; right padding in training
        only affects positions that no loss reads).
        Returns (output [B, T, C], v_first, the state after the last token or None).
        """
        mixed = self.mix(x, v_first, state, token_mask)
        # Step 8: the state update over the whole sequence.
        y, wkv_state = wkv7(
            *mixed.wkv_inputs,
            scale=1.0,
            initial_state=state.wkv if state is not None else None,
            output_final_state=state is not None,
            decay_floor=-MAX_LOG_DECAY,
        )
        new_state = None
        if state is not None:
            new_state = TimeMixerState(shift=mixed.last_input, wkv=wkv_state)
        return self.readout(y, mixed), mixed.v_first, new_state

    def mix(self, x: Tensor, v_first: Tensor | None = None, state: TimeMixerState | None = None,
            token_mask: Tensor | None = None) -> MixedInputs:
        """Steps 1-7: everything before the state update (arguments as `forward`)."""
        cfg = self.config
        B, T, _ = x.shape
        H, N = cfg.num_heads, cfg.head_size
        if token_mask is not None:
            x = x * token_mask[..., None].to(x.dtype)

        # Step 1: token shift. Delta_t = x_{t-1} - x_t with x_{-1} the carried shift (or 0).
        previous = state.shift[:, None, :].to(x.dtype) if state is not None else x.new_zeros(B, 1, x.shape[-1])
        delta = torch.cat([previous, x[:, :-1]], dim=1) - x
        xr, xw, xk, xv, xa, xg = (x + delta * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        # Step 2.
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        if self.r_norm is not None:
            r = self.r_norm(r.view(B, T, H, N)).view(B, T, -1)
            k = self.k_norm(k.view(B, T, H, N)).view(B, T, -1)
        # Step 3: log decay in (-exp(-1/2), 0).
        log_decay = -MAX_LOG_DECAY * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)
        # Step 4: in-context learning rate.
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        # Step 5: value residual.
        if (v_first is None) == cfg.value_residual:
            raise ValueError("a time mixer with value_residual=True needs v_first; the first converted "
                             "layer (value_residual=False) produces it and takes None")
        if cfg.value_residual:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        else:
            v_first = v
        # Step 6: gate.
        gate = torch.sigmoid(xg @ self.g1) @ self.g2
        # Step 7: removal key (unit norm per head) and replacement key.
        removal_key = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # [B, T, H, N]
        k = k * (1 + (iclr - 1) * self.k_a)
        if token_mask is not None:  # padding writes nothing into the state
            k = k * token_mask[..., None].to(k.dtype)

        r, k, v, log_decay, iclr = (t.view(B, T, H, N) for t in (r, k, v, log_decay, iclr))
        return MixedInputs(r=r, w=log_decay, k=k, v=v, a=-removal_key, b=removal_key * iclr, gate=gate,
                           v_first=v_first, last_input=x[:, -1])

    def mix_stacked(self, parameters: dict[str, Tensor], x: Tensor, v_first: Tensor | None,
                    token_mask: Tensor | None = None) -> MixedInputs:
        """`mix` for L mixers shaped like this one, as one call: `parameters` from `stack_parameters`,
        x [L, B, T, C] (each mixer's own input), v_first [B, T, C_att] shared by all (or None where
        they produce their own). Every tensor of the result gains the leading L.

        Stage 1 runs all layers' mixers this way (modeling/alignment.py): each step is one batched
        kernel over every layer instead of one per layer. torch.func.vmap makes `mix` itself the
        definition, run with each mixer's parameters in turn, in a batched form.
        """
        return MixedInputs(*self._mix_each(_MethodAsForward(self, "mix"), parameters, x, v_first, token_mask))

    def readout_stacked(self, parameters: dict[str, Tensor], y: Tensor, mixed: MixedInputs) -> Tensor:
        """`readout` for L mixers as one call (as `mix_stacked`): y [L, B, T, H, N] -> [L, B, T, C]."""
        return self._readout_each(_MethodAsForward(self, "readout"), parameters, y, mixed.as_tuple())

    @staticmethod
    def _mix_each(method: _MethodAsForward, parameters: dict[str, Tensor], x: Tensor, v_first: Tensor | None,
                  token_mask: Tensor | None) -> tuple[Tensor, ...]:
        def mix_one(one: dict[str, Tensor], x_one: Tensor) -> tuple[Tensor, ...]:
            return torch.func.functional_call(method, one, (x_one, v_first, None, token_mask), strict=True).as_tuple()
        return torch.func.vmap(mix_one)(method.named(parameters), x)

    @staticmethod
    def _readout_each(method: _MethodAsForward, parameters: dict[str, Tensor], y: Tensor,
                      mixed: tuple[Tensor, ...]) -> Tensor:
        def readout_one(one: dict[str, Tensor], y_one: Tensor, mixed_one: tuple[Tensor, ...]) -> Tensor:
            return torch.func.functional_call(method, one, (y_one, MixedInputs(*mixed_one)), strict=True)
        return torch.func.vmap(readout_one)(method.named(parameters), y, mixed)

    def readout(self, y: Tensor, mixed: MixedInputs) -> Tensor:
        """Steps 9-11: the output [B, T, C] from the state update's output y [B, T, H, N]."""
        B, T, H, N = y.shape
        # Step 9: per-head GroupNorm.
        y = self.ln_x(y.reshape(B * T, H * N)).view(B, T, H * N)
        # Step 10: bonus, one scalar per head times that head's value.
        bonus = (mixed.r * mixed.k * self.r_k).sum(dim=-1, keepdim=True) * mixed.v  # [B, T, H, N]
        y = y + bonus.reshape(B, T, H * N)
        # Step 11.
        return self.output(y * mixed.gate)


class _MethodAsForward(nn.Module):
    """One of a mixer's methods as a module's forward, which is what torch.func.functional_call runs.
    Its parameters are the mixer's, named "mixer.<name>". Always the class's eager method: a mixer's
    own `mix` may be compiled, and the stacked call compiles around all of it instead."""

    def __init__(self, mixer: RWKV7TimeMixer, method: str):
        super().__init__()
        self.mixer = mixer
        self.method = getattr(RWKV7TimeMixer, method)

    def forward(self, *args):
        return self.method(self.mixer, *args)

    @staticmethod
    def named(parameters: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"mixer.{name}": p for name, p in parameters.items()}
