"""Gradient spikes: what counts as one, and how report.md says so."""

from rwkvinside.distill.metrics import SPIKE_FACTOR, SPIKE_WINDOW, gradient_spikes
from rwkvinside.distill.pipeline import render_report


def log(norms):
    return [{"step": i + 1, "grad_norm": norm} for i, norm in enumerate(norms)]


def test_a_norm_above_ten_times_the_running_median_is_a_spike():
    norms = [1.0, 2.0] * 10 + [21.0, 1.5, 19.0]  # median of the steps before: 2.0 (upper middle)
    spikes = gradient_spikes(log(norms))
    assert spikes["count"] == 1 and spikes["steps_judged"] == len(norms) - 10
    assert spikes["worst"] == {"step": 21, "grad_norm": 21.0, "median": 2.0}


def test_the_first_ten_steps_are_not_judged_and_a_skipped_step_is_not_a_spike():
    assert gradient_spikes(log([1.0, 500.0, 1.0, 1.0]))["count"] == 0
    assert gradient_spikes(log([1.0] * 12 + [float("nan"), float("inf")]))["count"] == 0


def test_a_steady_rise_is_no_spike_but_a_jump_is():
    # Rising 5% a step, the norm is about 1.05^25 = 3.4x the median of the SPIKE_WINDOW steps before it.
    norms = [1.05**i for i in range(3 * SPIKE_WINDOW)]
    assert gradient_spikes(log(norms))["count"] == 0
    spikes = gradient_spikes(log(norms + [norms[-1] * SPIKE_FACTOR]))
    assert spikes["count"] == 1 and spikes["worst"]["step"] == 3 * SPIKE_WINDOW + 1


def test_report_names_the_spikes_of_a_stage_and_is_silent_without_them():
    stage = {"name": "knowledge distillation", "step": 30, "tokens": 100, "elapsed": 5.0, "ended_by": "max_steps",
             "final": {"loss": 0.5}}
    quiet = {"output": "runs/x", "stages": {"2": {**stage, "gradient_spikes": {"count": 0, "steps_judged": 20,
                                                                                "worst": None}}}}
    assert "gradient norm above" not in render_report(quiet)
    spiky = {"output": "runs/x", "stages": {"2": {**stage, "gradient_spikes": gradient_spikes(
        log([1.0] * 20 + [50.0]))}}}
    assert "Stage 2: 1 of 11 steps had a gradient norm above 10x the median of the 50 steps before " \
           "(the worst: 50 at step 21, median 1)" in render_report(spiky)
    assert "windows cut mid-text" in render_report({**spiky, "windows_cut_mid_text": True})
    led = render_report({**spiky, "windows_cut_mid_text": False})  # convert.lead, or data.eos_first true
    assert "windows cut mid-text" not in led and "every window starts after the EOS here" in led
