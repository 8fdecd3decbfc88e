"""The calibration run: windows of real text through the model, with the recurrent state carried explicitly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gdn2q.calib.artifact import CalibrationData, model_fingerprint
from gdn2q.calib.observers import ChannelRangeObserver, StateRangeObserver, ValueRangeObserver
from gdn2q.checkpoint import sha256_of
from gdn2q.data import load_tokenizer, tokenize_file, windows
from gdn2q.errors import DataError
from gdn2q.model.gdn2 import GDN2Mixer
from gdn2q.quant.state import StateQuantConfig

CLIP_STATS = ("absmax", "percentile", "mse")
STATE_EVERY = 64   # tokens between state reads: one chunk of the WY form, so each read costs no extra work


def _gate_hooks(model: nn.Module, gates: dict[str, ValueRangeObserver]) -> list:
    """Forward hooks turning b/w/f projection outputs into the gate values b, w and decay g of every layer."""
    handles = []
    for i, block in enumerate(model.model.layers):
        mixer = block.attn
        if not isinstance(mixer, GDN2Mixer):
            continue
        c = mixer.config
        hk, hv = (c.num_heads, c.head_dim), (c.value_heads, c.head_v_dim)
        gates[f"{i}.b"], gates[f"{i}.w"], gates[f"{i}.g"] = (ValueRangeObserver(hk), ValueRangeObserver(hv),
                                                             ValueRangeObserver(hk))

        def on_b(_m, _inp, out, i=i, scale=2.0 if c.allow_neg_eigval else 1.0):
            gates[f"{i}.b"].update(torch.sigmoid(out.float()) * scale)

        def on_w(_m, _inp, out, i=i):
            gates[f"{i}.w"].update(torch.sigmoid(out.float()))

        def on_f(_m, _inp, out, i=i, mixer=mixer, hk=hk):
            f = F.softplus(out.float() + mixer.dt_bias.float()).unflatten(-1, hk)
            gates[f"{i}.g"].update(-mixer.A_log.float().exp().unsqueeze(-1) * f)

        handles += [mixer.b_proj.register_forward_hook(on_b), mixer.w_proj.register_forward_hook(on_w),
                    mixer.f_proj.register_forward_hook(on_f)]
    return handles


@torch.no_grad()
def calibrate(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
              clip: tuple[str, ...] = ("absmax",), percentile: float = 99.99,
              source: dict | None = None, progress: Callable[[int, int], None] | None = None) -> CalibrationData:
    """Statistics of ``model`` over token ids [N] cut into windows of ``seq_len``.

    Each window starts from a zero state and is fed ``STATE_EVERY`` tokens at a time through an explicit
    fp32 :class:`DecodeState`, so the state after every chunk is read back (``state.<layer>.absmax``).
    ``progress(done, total)`` is called after every batch of windows.
    """
    unknown = [c for c in clip if c not in CLIP_STATS]
    if unknown:
        raise DataError(f"unknown clip statistic {unknown[0]!r}; choose from {', '.join(CLIP_STATS)}")
    wins = windows(ids, seq_len)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ranges = {n: ChannelRangeObserver(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda _m, inp, n=n: ranges[n].update(inp[0]))
               for n, m in linears.items()]
    gates: dict[str, ValueRangeObserver] = {}
    handles += _gate_hooks(model, gates)
    gdn_layers = [i for i, b in enumerate(model.model.layers) if isinstance(b.attn, GDN2Mixer)]
    cfg = model.config
    states = {i: StateRangeObserver(cfg.value_heads, cfg.head_dim) for i in gdn_layers}
    mixers = [m for m in model.modules() if isinstance(m, GDN2Mixer)]
    modes = [m.recurrence for m in mixers]
    model.set_recurrence("chunk")
    device = model.device
    try:
        for start in range(0, wins.shape[0], batch_size):
            batch = wins[start:start + batch_size].to(device)
            state = model.new_state(batch.shape[0], fmt=StateQuantConfig())
            for t in range(0, seq_len, STATE_EVERY):
                model(batch[:, t:t + STATE_EVERY], state)
                for i in gdn_layers:
                    states[i].update(state.layers[i].load())
            if progress:
                progress(min(start + batch_size, wins.shape[0]), wins.shape[0])
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(mixers, modes, strict=True):
            m.recurrence = mode
    tensors: dict[str, torch.Tensor] = {}
    for n, obs in ranges.items():
        tensors[f"linear.{n}.absmax"] = obs.absmax
        if "percentile" in clip:
            tensors[f"linear.{n}.percentile"] = obs.percentile(percentile)
        if "mse" in clip:
            tensors[f"linear.{n}.mse"] = obs.mse_clip()
    for key, obs in gates.items():
        for stat, t in obs.stats().items():
            tensors[f"gate.{key}.{stat}"] = t
    for i, obs in states.items():
        tensors[f"state.{i}.absmax"] = obs.absmax
    meta = {"tokens": str(wins.numel()), "seq_len": str(seq_len), "windows": str(wins.shape[0]),
            "clip": ",".join(clip), "state_every": str(STATE_EVERY), **(source or {})}
    if "percentile" in clip:
        meta["percentile"] = repr(percentile)
    return CalibrationData({k: v.float().contiguous() for k, v in sorted(tensors.items())}, meta)


def calibrate_text(model: nn.Module, text: Path, seq_len: int = 512, max_tokens: int | None = 16384,
                   batch_size: int = 4, clip: tuple[str, ...] = ("absmax",), percentile: float = 99.99,
                   progress: Callable[[int, int], None] | None = None) -> CalibrationData:
    """Tokenize ``text`` with the model's tokenizer.json and calibrate on it (at least one full window)."""
    tok = load_tokenizer(model.tokenizer_path)
    ids = tokenize_file(tok, text, max_tokens=max_tokens, min_tokens=seq_len)
    source = {"model_sha256": model_fingerprint(model), "model_name": Path(model.source_path).name,
              "data_name": Path(text).name, "data_sha256": sha256_of(Path(text))}
    return calibrate(model, ids, seq_len, batch_size, clip, percentile, source, progress)
