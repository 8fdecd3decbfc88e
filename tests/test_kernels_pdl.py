"""The programmatic-dependent-launch switch (gdn2q.kernels.pdl): off under the interpreter, GDN2Q_PDL=0 honoured,
and the constexpr always travels with the launch option."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gdn2q.config import GDN2Config
from gdn2q.kernels import pdl
from gdn2q.kernels.bench import bench_model

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not INTERPRETED, reason="checks the Triton interpreter (CPU CI)")
def test_pdl_is_off_under_the_interpreter():
    assert not pdl.SUPPORTED and not pdl.ENABLED
    with pdl.setting(True):   # even when asked for: the interpreter has no griddepcontrol
        for dev in ("cpu", "cuda"):
            assert pdl.launch_options(torch.device(dev)) == {"PDL": False}


def test_launch_options_pair_the_constexpr_with_the_launch_flag():
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for on in (False, True):
        with pdl.setting(on):
            for dev in devices:
                used = pdl.active(dev)
                assert pdl.launch_options(dev) == ({"PDL": True, "launch_pdl": True} if used else {"PDL": False})
                assert on or not used
    assert not pdl.active(torch.device("cpu"))


def test_setting_restores_the_module_flag():
    before = pdl.ENABLED
    with pytest.raises(RuntimeError), pdl.setting(not before):
        assert pdl.ENABLED is (not before)
        raise RuntimeError
    assert pdl.ENABLED is before


def _enabled_in_fresh_process(**env: str) -> tuple[bool, bool]:
    """(SUPPORTED, ENABLED) as a new compiled-mode (not interpreted) process sees them with ``env`` added."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GDN2Q_PDL")}
    code = "from gdn2q.kernels import pdl; print(int(pdl.SUPPORTED), int(pdl.ENABLED))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return bool(int(out[0])), bool(int(out[1]))


def test_environment_variable_turns_pdl_off():
    supported, enabled = _enabled_in_fresh_process()
    assert enabled == supported   # on by default wherever Triton has launch_pdl and gdc_wait
    assert _enabled_in_fresh_process(GDN2Q_PDL="0") == (supported, False)
    assert _enabled_in_fresh_process(GDN2Q_PDL="1") == (supported, supported)


def test_bench_model_times_the_step_with_and_without_pdl():
    cfg = GDN2Config(hidden_size=64, num_hidden_layers=1, num_heads=2, head_dim=32, vocab_size=50)
    r = bench_model(cfg, batch=2, state="int8", recipe="bf16", prompt_len=8, decode_reps=1, device="cpu",
                    pdl_mode="both")
    assert r["pdl"] is False   # CPU: nothing to launch early
    assert r["decode_step_ms_pdl_off"] > 0 and r["decode_step_ms_pdl_on"] > 0
    assert r["decode_step_ms"] == min(r["decode_step_ms_pdl_off"], r["decode_step_ms_pdl_on"])   # the faster
    with pytest.raises(ValueError, match="pdl_mode"):
        bench_model(cfg, pdl_mode="maybe", device="cpu")
