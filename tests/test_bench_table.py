"""tools/bench_kernels.py's table: each decode row's traffic against the 2 GiB copy and against a copy of its own
bytes (the figures the issue's bandwidth goal is read from), and prefill rows without traffic figures."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def _bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "tools" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_reports_both_copy_ratios():
    mod = _bench_kernels()
    meta = {"card": "Test GPU", "versions": {"torch": "t", "triton": "r", "fla": "0.6.0"}, "copy_GBps": 4000.0}
    rows = [{"op": "decode", "B": 256, "T": 1, "state": "int8", "kernel": "gluon-staged", "us": 50.0, "fla_us": 150.0,
             "speedup": 3.0, "state_GBps": 2800.0, "copy_GBps": 4000.0, "copy_same_bytes_GBps": 3500.0},
            {"op": "prefill", "B": 1, "T": 8192, "state": "int8", "us": 700.0, "fla_us": 800.0, "speedup": 800 / 700,
             "state_GBps": None, "copy_GBps": 4000.0}]
    table = mod.markdown(meta, rows).splitlines()
    header = [c.strip() for c in table[4].strip("|").split("|")]
    decode = dict(zip(header, (c.strip() for c in table[6].strip("|").split("|")), strict=True))
    prefill = dict(zip(header, (c.strip() for c in table[7].strip("|").split("|")), strict=True))
    assert decode["% of copy"] == "70" and decode["% of same-size copy"] == "80"
    assert prefill["% of copy"] == "-" and prefill["% of same-size copy"] == "-"
    assert "same-size copy" in table[2]
