"""RWKV7TimeMixer against the RWKV-7 time mix of docs/rwkv7.md, written out here step by step.

The reference below is independent of the library: one token at a time, one formula per numbered
step of the document, in float64. It reads the mixer's parameters (so autograd can compare the
gradients of both) but none of its code.
"""

import dataclasses
import itertools
import math

import pytest
import torch

from rwkvinside.modeling import time_mixer as time_mixer_module
from rwkvinside.modeling.time_mixer import (MAX_LOG_DECAY, RWKV7TimeMixer, TimeMixerConfig, TimeMixerState,
                                           stack_parameters)
from rwkvinside.ops import wkv7

from .helpers import perturb_

SMALL_RANKS = {"decay_rank": 8, "iclr_rank": 8, "value_rank": 8, "gate_rank": 16}
CONFIGS = {
    # Llama-like: no biases, C_att == C.
    "plain": TimeMixerConfig(hidden_size=32, num_heads=2, head_size=16, layer_id=1, num_layers=3,
                             **SMALL_RANKS),
    # Qwen-like: biases on every projection, per-head q/k RMSNorm, and C_att = 3 * 8 != C = 32.
    "bias_qknorm": TimeMixerConfig(hidden_size=32, num_heads=3, head_size=8, layer_id=2, num_layers=3,
                                   bias=(True, True, True, True), qk_norm_eps=1e-6, **SMALL_RANKS),
}


over_configs = pytest.mark.parametrize("config_name", sorted(CONFIGS))
over_roles = pytest.mark.parametrize("producer", [True, False], ids=["producer", "later_layer"])


def make_mixer(name: str, producer: bool, dtype: torch.dtype = torch.float64, seed: int = 0) -> RWKV7TimeMixer:
    """The first converted layer (producer of v_first, no value residual) or a later one."""
    config = dataclasses.replace(CONFIGS[name], value_residual=not producer)
    return perturb_(RWKV7TimeMixer(config).to(dtype), seed=seed)


def reference_time_mix(m: RWKV7TimeMixer, x, v_first=None, shift=None, wkv=None):
    """docs/rwkv7.md steps 1-11, token by token. x: [B, T, C]; v_first: [B, T, C_att] or None.
    Returns (output [B, T, C], v_first [B, T, C_att], last input [B, C], state [B, H, N, N])."""
    cfg = m.config
    B, T, C = x.shape
    H, N = cfg.num_heads, cfg.head_size

    def linear(layer, inp):
        return inp @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    def per_head(t):  # [B, C_att] -> [B, H, N]
        return t.reshape(B, H, N)

    def head_rms(t, weight):  # Qwen3's q_norm / k_norm, per head
        t = per_head(t)
        return (t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.qk_norm_eps) * weight).reshape(B, -1)

    previous = x.new_zeros(B, C) if shift is None else shift
    S = x.new_zeros(B, H, N, N) if wkv is None else wkv.to(x.dtype)  # key rows, value columns
    outputs, first_values = [], []
    for t in range(T):
        xt = x[:, t]
        # 1. token shift
        delta = previous - xt
        xr, xw, xk, xv, xa, xg = (xt + mu * delta for mu in (m.x_r, m.x_w, m.x_k, m.x_v, m.x_a, m.x_g))
        # 2. projections
        r, k_tilde, v = linear(m.receptance, xr), linear(m.key, xk), linear(m.value, xv)
        if cfg.qk_norm_eps is not None:
            r, k_tilde = head_rms(r, m.r_norm.weight), head_rms(k_tilde, m.k_norm.weight)
        # 3. decay: log w = -e^{-1/2} sigmoid(w0 + tanh(x A) B)
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(m.w0 + torch.tanh(xw @ m.w1) @ m.w2))
        # 4. in-context learning rate, no activation between the LoRA matrices
        a = torch.sigmoid(m.a0 + (xa @ m.a1) @ m.a2)
        # 5. value residual
        if v_first is None:
            first = v
        else:
            first = v_first[:, t]
            v = v + (first - v) * torch.sigmoid(m.v0 + (xv @ m.v1) @ m.v2)
        # 6. gate
        g = torch.sigmoid(xg @ m.g1) @ m.g2
        # 7. removal key (unit norm per head) and replacement key
        kappa = per_head(k_tilde * m.k_k)
        kappa = kappa / kappa.norm(dim=-1, keepdim=True)
        k = k_tilde * (1 + (a - 1) * m.k_a)
        r, k, v, w, a = map(per_head, (r, k, v, w, a))
        # 8. S_t = diag(w) S - (kappa * a)(kappa^T S) + k v^T ;  y = S^T r
        S = (w[..., :, None] * S
             - (kappa * a)[..., :, None] * (kappa[..., None, :] @ S)
             + k[..., :, None] * v[..., None, :])
        y = (S * r[..., :, None]).sum(dim=-2)  # [B, H, N_v]
        # 9. GroupNorm with H groups, eps = head_size * 1e-5
        y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + N * 1e-5)
        y = y.reshape(B, -1) * m.ln_x.weight + m.ln_x.bias
        # 10. bonus: one scalar per head times that head's value
        y = y + ((r * k * m.r_k).sum(-1, keepdim=True) * v).reshape(B, -1)
        # 11. output
        outputs.append(linear(m.output, y * g))
        first_values.append(first)
        previous = xt
    return torch.stack(outputs, 1), torch.stack(first_values, 1), previous, S


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_inputs(config: TimeMixerConfig, batch=2, length=7, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, config.hidden_size, generator=generator, dtype=torch.float64)
    v_first = torch.randn(batch, length, config.attention_size, generator=generator, dtype=torch.float64)
    shift = torch.randn(batch, config.hidden_size, generator=generator, dtype=torch.float64)
    wkv = 0.3 * torch.randn(batch, config.num_heads, config.head_size, config.head_size,
                            generator=generator, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, v_first, shift, wkv))


@over_configs
@over_roles
@pytest.mark.parametrize("carried", [False, True], ids=["fresh", "carried_state"])
def test_forward_matches_reference(config_name, producer, carried):
    mixer = make_mixer(config_name, producer)
    x, v_first, shift, wkv = random_inputs(mixer.config)
    given_v_first = None if producer else v_first
    state = TimeMixerState(shift=shift, wkv=wkv) if carried else None

    with torch.no_grad():
        out, returned_v_first, new_state = mixer(x, given_v_first, state)
        ref_out, ref_v_first, ref_shift, ref_wkv = reference_time_mix(
            mixer, x, given_v_first, *((shift, wkv) if carried else ()))

    assert relative_error(out, ref_out) <= 1e-10
    assert relative_error(returned_v_first, ref_v_first) <= 1e-10  # producer: its own v; else unchanged
    if not producer:
        assert returned_v_first is v_first
    if carried:
        assert torch.equal(new_state.shift, ref_shift)
        assert relative_error(new_state.wkv, ref_wkv) <= 1e-10
    else:
        assert new_state is None


GRADIENT_PARAMETERS = ("x_w", "x_v", "w1", "a1", "a2", "v1", "g1", "k_k", "k_a", "r_k",
                       "receptance.weight", "value.weight", "output.weight", "ln_x.weight")
VALUE_RESIDUAL = {"v0", "v1", "v2"}  # step 5: only a later layer has them


@over_configs
@over_roles
def test_gradients_match_reference(config_name, producer):
    mixer = make_mixer(config_name, producer)
    x, v_first, shift, wkv = random_inputs(mixer.config)
    given_v_first = None if producer else v_first.requires_grad_()
    names = ["x"] + ([] if producer else ["v_first"])
    names += [name for name in GRADIENT_PARAMETERS if not (producer and name in VALUE_RESIDUAL)]
    names += ["r_norm.weight", "k_norm.weight"] if mixer.r_norm is not None else []
    tensors = [x.requires_grad_()] + ([] if producer else [v_first])
    tensors += [mixer.get_parameter(name) for name in names[len(tensors):]]
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    out, _, new_state = mixer(x, given_v_first, TimeMixerState(shift=shift, wkv=wkv))
    ref_out, _, _, ref_wkv = reference_time_mix(mixer, x, given_v_first, shift, wkv)
    grads = torch.autograd.grad((out * weights).sum() + new_state.wkv.sum(), tensors, allow_unused=True)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_wkv.sum(), tensors, allow_unused=True)

    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        assert ref_grad.abs().max() > 0, f"the reference gradient of {name} is zero: the test is too weak"
        assert relative_error(grad, ref_grad) <= 1e-9, name


def run_in_pieces(mixer, x, v_first, cuts):
    """Feed [0, cuts[0]), [cuts[0], cuts[1]), ... carrying the state; concatenated outputs."""
    state = TimeMixerState.zeros(x.shape[0], mixer.config, x.device, x.dtype)
    bounds = [0, *cuts, x.shape[1]]
    outputs = []
    for start, end in itertools.pairwise(bounds):
        piece_v_first = None if v_first is None else v_first[:, start:end]
        out, _, state = mixer(x[:, start:end], piece_v_first, state)
        outputs.append(out)
    return torch.cat(outputs, dim=1), state


@over_configs
@over_roles
def test_chunked_calls_equal_one_call(config_name, producer):
    mixer = make_mixer(config_name, producer, dtype=torch.float32)
    x, v_first, _, _ = random_inputs(mixer.config, length=12, dtype=torch.float32)
    v_first = None if producer else v_first
    with torch.no_grad():
        whole, whole_state = run_in_pieces(mixer, x, v_first, [])
        stateless, _, _ = mixer(x, v_first)
        torch.testing.assert_close(stateless, whole, rtol=0, atol=0)
        for cuts in ([5], [3, 8], list(range(1, 12))):
            out, state = run_in_pieces(mixer, x, v_first, cuts)
            torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5, msg=f"cuts {cuts}")
            torch.testing.assert_close(state.shift, whole_state.shift, rtol=0, atol=0)
            torch.testing.assert_close(state.wkv, whole_state.wkv, rtol=1e-5, atol=1e-5, msg=f"cuts {cuts}")


@over_configs
@over_roles
def test_left_padding_does_not_change_real_positions(config_name, producer):
    mixer = make_mixer(config_name, producer, dtype=torch.float32)
    x, v_first, _, _ = random_inputs(mixer.config, length=9, dtype=torch.float32)
    pad = 4
    garbage = 3 * torch.randn(x.shape[0], pad, x.shape[2], generator=torch.Generator().manual_seed(9))
    padded_x = torch.cat([garbage, x], dim=1)
    padded_v_first = torch.cat([torch.randn(x.shape[0], pad, v_first.shape[2]), v_first], dim=1)
    mask = torch.cat([torch.zeros(x.shape[0], pad), torch.ones(x.shape[:2])], dim=1).long()
    zeros = TimeMixerState.zeros(x.shape[0], mixer.config, x.device, x.dtype)
    with torch.no_grad():
        expected, _, expected_state = mixer(x, None if producer else v_first, zeros)
        out, _, state = mixer(padded_x, None if producer else padded_v_first, zeros, token_mask=mask)
    torch.testing.assert_close(out[:, pad:], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.wkv, expected_state.wkv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.shift, expected_state.shift)


@over_roles
def test_only_a_later_layer_has_value_residual_weights(producer):
    mixer = make_mixer("plain", producer)
    names = {name for name, _ in mixer.named_parameters()}
    assert names & VALUE_RESIDUAL == (set() if producer else VALUE_RESIDUAL)
    x, v_first, _, _ = random_inputs(mixer.config)
    with pytest.raises(ValueError, match="value_residual"):
        mixer(x, v_first if producer else None)


def test_lora_ranks_for_width_576():
    config = TimeMixerConfig(hidden_size=576, num_heads=9, head_size=64, value_residual=True)
    assert {name: config.rank(name) for name in ("decay", "iclr", "value", "gate")} == \
        {"decay": 64, "iclr": 64, "value": 32, "gate": 128}
    mixer = RWKV7TimeMixer(config)
    assert mixer.w1.shape == (576, 64) and mixer.w2.shape == (64, 576)
    assert mixer.a1.shape == (576, 64) and mixer.v1.shape == (576, 32) and mixer.g1.shape == (576, 128)


def test_fresh_decay_lies_in_the_rwkv7_range(monkeypatch):
    """w = exp(log w) in (exp(-e^{-1/2}), 1) = (0.545, 1), whatever the input."""
    seen = {}
    wkv7 = time_mixer_module.wkv7

    def recording_wkv7(r, w, *args, **kwargs):
        seen["log_decay"] = w
        return wkv7(r, w, *args, **kwargs)

    config = TimeMixerConfig(hidden_size=64, num_heads=4, head_size=16, layer_id=2, num_layers=4)
    mixer = RWKV7TimeMixer(config)
    monkeypatch.setattr(time_mixer_module, "wkv7", recording_wkv7, raising=True)
    with torch.no_grad():
        mixer(20 * torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3)))
    decay = seen["log_decay"].exp()
    assert decay.shape == (2, 16, 4, 16)
    assert decay.min() > math.exp(-math.exp(-0.5)) > 0.545 and decay.max() < 1
    assert decay.max() - decay.min() > 0.3  # the initial decays are spread out, not one constant


def test_compiled_mixer_matches_reference_forward_backward_and_carried_state():
    """compile_around_state_update (torch.compile, inductor, one graph each for steps 1-7 and 9-11:
    fullgraph fails on any break) computes what the step-by-step reference does, over two calls that
    carry the state, and so do its gradients."""
    torch._dynamo.reset()  # no compiled code or recompilation count left from other tests
    mixer = make_mixer("bias_qknorm", producer=False)
    mixer.compile_around_state_update(fullgraph=True)
    x, v_first, shift, wkv = random_inputs(mixer.config, length=10)
    x.requires_grad_()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    tensors = [x, mixer.w1, mixer.v1, mixer.g2, mixer.x_a, mixer.k_norm.weight, mixer.ln_x.weight]

    first, _, state = mixer(x[:, :6], v_first[:, :6], TimeMixerState(shift=shift, wkv=wkv))
    second, _, state = mixer(x[:, 6:], v_first[:, 6:], state)
    ref_out, _, ref_shift, ref_wkv = reference_time_mix(mixer, x, v_first, shift, wkv)
    assert relative_error(torch.cat([first, second], 1), ref_out) <= 1e-10
    assert torch.equal(state.shift, ref_shift) and relative_error(state.wkv, ref_wkv) <= 1e-10

    loss = (torch.cat([first, second], 1) * weights).sum() + state.wkv.sum()
    grads = torch.autograd.grad(loss, tensors)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_wkv.sum(), tensors)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(grad, ref_grad) <= 1e-9


def stacked_time_mix(mixers: list[RWKV7TimeMixer], x: torch.Tensor, v_first: torch.Tensor | None) -> torch.Tensor:
    """All mixers as stage 1 runs them: steps 1-7 stacked, one state update over all their sequences,
    steps 9-11 stacked. x: [L, B, T, C] -> [L, B, T, C]."""
    template, parameters = mixers[0], stack_parameters(mixers)
    mixed = template.mix_stacked(parameters, x, v_first)
    y, _ = wkv7(*(t.flatten(0, 1) for t in mixed.wkv_inputs), scale=1.0, decay_floor=-MAX_LOG_DECAY)
    return template.readout_stacked(parameters, y.unflatten(0, (len(mixers), -1)), mixed)


@pytest.mark.parametrize(("config_name", "producer", "compiled"), [
    *((name, producer, False) for name in sorted(CONFIGS) for producer in (True, False)),
    ("bias_qknorm", False, True),  # compiled as stage 1 runs it (later layers); compiling costs ~15 s
])
def test_stacked_mixers_match_the_reference_forward_and_backward(config_name, producer, compiled):
    """mix_stacked/readout_stacked: several differently initialised mixers of one shape in one call
    compute what each does alone by the step-by-step reference, and the gradients reach each mixer's
    own parameters, the inputs and the shared v_first as the reference's do."""
    torch._dynamo.reset()
    mixers = [make_mixer(config_name, producer, seed=seed) for seed in range(3)]
    if compiled:
        for mixer in mixers:
            mixer.compile_around_state_update(fullgraph=True)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 9, mixers[0].config.hidden_size, generator=generator, dtype=torch.float64,
                    requires_grad=True)
    v_first = None if producer else torch.randn(2, 9, mixers[0].config.attention_size, generator=generator,
                                                dtype=torch.float64, requires_grad=True)
    weights = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    inputs = [x] + ([] if producer else [v_first])
    parameters = [p for mixer in mixers for p in mixer.parameters()]

    out = stacked_time_mix(mixers, x, v_first)
    reference = torch.stack([reference_time_mix(mixer, x[i], v_first)[0] for i, mixer in enumerate(mixers)])
    assert relative_error(out, reference) <= 1e-10
    grads = torch.autograd.grad((out * weights).sum(), inputs + parameters)
    ref_grads = torch.autograd.grad((reference * weights).sum(), inputs + parameters)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(grad, ref_grad) <= 1e-9
