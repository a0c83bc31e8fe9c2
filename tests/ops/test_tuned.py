"""Recorded kernel choices: what is recorded, what is seeded, and what a stale record may not seed.

The autotuners here are plain objects with the attributes Triton's `Autotuner` has (`configs`,
`cache`, `base_fn`), so the logic runs on the CPU; on a GPU the last test seeds fla's own kernels.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from rwkvinside.ops.wkv7 import tuned
from rwkvinside.ops.wkv7.fla import fla_available


def make_config(block: int, warps: int, stages: int = 2) -> SimpleNamespace:
    return SimpleNamespace(kwargs={"BLOCK": block}, num_warps=warps, num_stages=stages, num_ctas=1, maxnreg=None)


def kernel_fn(name: str) -> SimpleNamespace:
    return SimpleNamespace(__module__="fla.ops.fake", __qualname__=name)


def make_autotuner(name: str = "chunk_fwd_kernel") -> SimpleNamespace:
    configs = [make_config(block, warps) for block in (16, 32, 64) for warps in (2, 4)]
    return SimpleNamespace(configs=configs, cache={}, base_fn=kernel_fn(name))


def test_a_record_round_trips_through_json_into_a_fresh_process_cache():
    tuned_in_one_process = make_autotuner()
    key = (64, 64, True, "torch.bfloat16")
    tuned_in_one_process.cache[key] = tuned_in_one_process.configs[3]
    data = json.loads(json.dumps(tuned.record([tuned_in_one_process], fla_version="0.6.0",
                                              device="NVIDIA H200", arch="sm90")))

    fresh = make_autotuner()
    assert tuned.seed([fresh], data, fla_version="0.6.0") == 1
    # The very candidate object the kernel would have chosen, under the key Triton builds (a tuple).
    assert fresh.cache == {key: fresh.configs[3]}


def test_a_record_from_another_fla_version_or_format_seeds_nothing():
    source = make_autotuner()
    source.cache[(64,)] = source.configs[0]
    data = tuned.record([source], fla_version="0.5.0", device="NVIDIA H200", arch="sm90")
    fresh = make_autotuner()
    assert tuned.seed([fresh], data, fla_version="0.6.0") == 0
    assert tuned.seed([fresh], {**data, "fla": "0.6.0", "format": 99}, fla_version="0.6.0") == 0
    assert fresh.cache == {}


def test_a_config_that_is_no_longer_a_candidate_is_skipped_and_other_kernels_are_untouched():
    data = {"format": tuned.RECORD_FORMAT, "fla": "0.6.0", "kernels": {
        "fla.ops.fake.chunk_fwd_kernel": [
            [[64], tuned.describe_config(make_config(128, 8))],  # not among the candidates
            [[32], tuned.describe_config(make_config(32, 4))],
        ]}}
    wanted, other = make_autotuner(), make_autotuner("other_kernel")
    assert tuned.seed([wanted, other], data, fla_version="0.6.0") == 1
    assert list(wanted.cache) == [(32,)] and wanted.cache[(32,)].kwargs == {"BLOCK": 32}
    assert other.cache == {}


def test_a_key_already_tuned_in_this_process_is_kept():
    autotuner = make_autotuner()
    autotuner.cache[(64,)] = autotuner.configs[0]
    data = {"format": tuned.RECORD_FORMAT, "fla": "0.6.0",
            "kernels": {tuned.kernel_name(autotuner): [[[64], tuned.describe_config(autotuner.configs[5])]]}}
    assert tuned.seed([autotuner], data, fla_version="0.6.0") == 0
    assert autotuner.cache[(64,)] is autotuner.configs[0]


def test_merging_keeps_old_keys_and_takes_new_choices_but_drops_a_record_of_another_version():
    def entry(key, block):
        return [key, tuned.describe_config(make_config(block, 4))]

    old = {"format": 1, "fla": "0.6.0", "arch": "sm90", "kernels": {
        "k1": [entry([64], 16), entry([128], 16)], "k2": [entry([1], 32)]}}
    new = {"format": 1, "fla": "0.6.0", "arch": "sm90", "device": "H200", "kernels": {"k1": [entry([64], 64)]}}
    merged = tuned.merge_records(old, new)
    assert merged["kernels"]["k1"] == sorted([entry([64], 64), entry([128], 16)], key=json.dumps)
    assert merged["kernels"]["k2"] == [entry([1], 32)]
    assert tuned.merge_records({**old, "fla": "0.5.0"}, new) == new


def test_shipped_records_are_well_formed():
    """Every record in the package names its fla version and arch and holds only candidate-shaped entries."""
    for path in sorted(tuned.TUNED_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        assert data["format"] == tuned.RECORD_FORMAT and data["arch"] == path.stem and data["fla"]
        for entries in data["kernels"].values():
            for key, config in entries:
                assert isinstance(key, list)
                assert set(config) == {"kwargs", "num_warps", "num_stages", "num_ctas", "maxnreg"}


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla")
def test_on_a_gpu_fla_kernels_are_found_and_the_shipped_record_seeds_them():
    used = tuned.seed_fla_kernels()
    names = {tuned.kernel_name(a) for a in tuned.fla_autotuners()}
    assert any(".generalized_delta_rule.dplr." in name for name in names)
    if tuned.record_path(tuned.cuda_arch()).is_file():
        assert used > 0
