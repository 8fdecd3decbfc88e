"""Sensitivity analysis: quantize one group at a time, rank the groups by the KL they cause, and search the
most compressed precision policy that stays within a perplexity budget (``--recipe auto``).

Groups (gdn2q.model.groups names): qkv, b_proj, w_proj, f_proj, g_proj, o_proj, mlp, lm_head, attention
(hybrid models) for the weights, with one weight recipe; and ``state`` (the recurrent state stored in one
format between every two tokens, measured on the decode path). The quantizer is the recipe's own library
(torchao / bitsandbytes); only the grouping and the search are written here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gdn2q.eval.metrics import AgreementMeter, token_stats
from gdn2q.eval.stream import stacked_state, state_bytes
from gdn2q.model.groups import param_group
from gdn2q.quant.state import StateQuantConfig

WEIGHT_GROUPS = ("qkv", "b_proj", "w_proj", "f_proj", "g_proj", "o_proj", "mlp", "lm_head", "attention")
# --keep regexes (gdn2q quantize) that keep one group in the source precision; lm_head is always kept there
KEEP_REGEX = {"qkv": r"\.attn\.[qkv]_proj$", "b_proj": r"\.b_proj$", "w_proj": r"\.w_proj$",
              "f_proj": r"\.f_proj\.", "g_proj": r"\.g_proj\.", "o_proj": r"\.attn\.o_proj$", "mlp": r"\.mlp\.",
              "attention": r"\.attn\.(q_proj|k_proj|v_proj|o_proj)$"}
# state formats from the most to the least compressed (bytes per head, K = V = 128), tried in this order
STATE_CANDIDATES = (StateQuantConfig("int8"), StateQuantConfig("fp8"), StateQuantConfig("bf16"),
                    StateQuantConfig("int8", rounding="error-feedback"), StateQuantConfig())


def linear_groups(model: nn.Module) -> dict[str, list[str]]:
    """{group: names of the nn.Linear modules in it}, groups in WEIGHT_GROUPS order (empty ones left out)."""
    cfg = model.config
    attn = frozenset(cfg.attn.layers) if cfg.attn else frozenset()
    out: dict[str, list[str]] = {g: [] for g in WEIGHT_GROUPS}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            group = param_group(f"{name}.weight", attn)
            if group in out:
                out[group].append(name)
    return {g: names for g, names in out.items() if names}


def quantize_linears(model: nn.Module, names: list[str], recipe: str) -> nn.Module:
    """Quantize exactly the named Linears of ``model`` (in place) with a gdn2q recipe's library config."""
    from gdn2q.quant.apply import bnb_linear, replace_module
    from gdn2q.quant.libs import quant_libs
    from gdn2q.quant.recipes import check_runnable, get_recipe

    quant_libs()
    r = get_recipe(recipe)
    check_runnable(r, model.device)
    modules = dict(model.named_modules())
    if r.torchao is not None:
        from torchao.quantization import quantize_

        for name in names:
            cfg = r.config_for(modules[name], model.device)
            if cfg is not None:   # shapes the recipe cannot take stay in the source precision
                quantize_(model, cfg, filter_fn=lambda _m, fqn, name=name: fqn == name)
    else:
        for name in names:
            replace_module(model, name, bnb_linear(modules[name], r.bnb))
    return model


@dataclass
class EvalSet:
    """Windows [N, T] of text with the base model's logits on them (full forwards, fp32 state)."""

    windows: torch.Tensor
    base_logits: torch.Tensor

    @classmethod
    def build(cls, base: nn.Module, windows: torch.Tensor) -> EvalSet:
        with torch.no_grad():
            return cls(windows, base(windows.to(base.device)).float().cpu())

    @torch.no_grad()
    def measure(self, model: nn.Module, state: StateQuantConfig | None = None) -> dict:
        """KL(base || model), top-1 agreement and perplexities; ``state`` streams the windows through the decode
        path with the state stored in that format between every two tokens."""
        ids = self.windows.to(model.device)
        if state is None or state == StateQuantConfig():
            logits = model(ids)
        else:
            logits = model(ids, stacked_state(model, [state], rows=ids.shape[0]))
        meter = AgreementMeter(self.windows.shape[1])
        meter.add(token_stats(self.base_logits[:, :-1], logits[:, :-1].float().cpu(), self.windows[:, 1:]))
        r = meter.result()
        return {k: r[k] for k in ("kl_mean", "kl_p999", "top1_agreement", "ppl_increase")} | {
            "ppl": r["candidate"]["ppl"], "base_ppl": r["base"]["ppl"]}


def weight_bytes(model: nn.Module, names: list[str], bits: float) -> tuple[int, int]:
    """(bytes in the source dtype, bytes at ``bits`` per weight) of the named Linears' weights."""
    modules = dict(model.named_modules())
    n = sum(modules[x].weight.numel() for x in names)
    return n * modules[names[0]].weight.element_size(), int(n * bits / 8)


RECIPE_BITS = {"int8-wo": 8, "w8a8-int8": 8, "fp8-wo": 8, "w8a8-fp8": 8, "int4-wo": 4.25, "bnb-int8": 8,
               "bnb-nf4": 4.5}


def sensitivity(base: nn.Module, evalset: EvalSet, recipe: str = "int8-wo",
                state: StateQuantConfig = StateQuantConfig("int8"),
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per group (that group alone quantized), sorted from the most to the least sensitive (KL)."""
    groups = linear_groups(base)
    rows = []
    total = len(groups) + 1
    for i, (group, names) in enumerate(groups.items()):
        cand = quantize_linears(copy.deepcopy(base), names, recipe)
        src, quant = weight_bytes(base, names, RECIPE_BITS.get(recipe, 8))
        rows.append({"group": group, "what": f"{recipe}: {len(names)} Linears", "bytes_saved": src - quant,
                     **evalset.measure(cand)})
        if progress:
            progress(i + 1, total)
    per_layer = state_bytes(base.config, state)["recurrent"]
    fp32 = state_bytes(base.config, StateQuantConfig())["recurrent"]
    rows.append({"group": "state", "what": f"state {state.label}",
                 "bytes_saved": (fp32 - per_layer) * len(base.config.gdn2_layers), **evalset.measure(base, state)})
    if progress:
        progress(total, total)
    return sorted(rows, key=lambda r: -r["kl_mean"])


def auto_policy(base: nn.Module, evalset: EvalSet, ranking: list[dict], max_ppl_increase: float,
                recipe: str = "int8-wo", progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy search: add weight groups from the least to the most sensitive while the perplexity increase
    stays within ``max_ppl_increase`` (a fraction, 0.01 = 1%), then pick the most compressed state format that
    still fits. lm_head is left out (the quantize policy always keeps it). Returns the policy, what it measured
    and the ``gdn2q quantize`` options that apply it."""
    order = [r["group"] for r in reversed(ranking) if r["group"] in KEEP_REGEX]
    groups = linear_groups(base)
    chosen: list[str] = []
    trail = []
    current = base
    step, total = 0, len(order) + len(STATE_CANDIDATES)
    for group in order:
        cand = quantize_linears(copy.deepcopy(current), groups[group], recipe)
        m = evalset.measure(cand)
        ok = m["ppl_increase"] <= max_ppl_increase
        trail.append({"add": group, "ok": ok, **m})
        if ok:
            chosen.append(group)
            current = cand
        step += 1
        if progress:
            progress(step, total)
    state_pick, state_m = StateQuantConfig(), None
    for fmt in STATE_CANDIDATES:
        m = evalset.measure(current, fmt)
        trail.append({"state": fmt.label, "ok": m["ppl_increase"] <= max_ppl_increase, **m})
        step += 1
        if progress:
            progress(step, total)
        if m["ppl_increase"] <= max_ppl_increase:
            state_pick, state_m = fmt, m
            break
    final = state_m or evalset.measure(current)
    kept = [g for g in groups if g not in chosen and g in KEEP_REGEX]
    gates = "quantize" if any(g in chosen for g in ("b_proj", "w_proj", "f_proj", "g_proj")) else "keep"
    keep = [KEEP_REGEX[g] for g in kept if gates == "quantize" or g not in ("b_proj", "w_proj", "f_proj", "g_proj")]
    options = [f"--recipe {recipe}", f"--gates {gates}", *(f"--keep '{k}'" for k in keep),
               f"--state {state_pick.dtype}", f"--state-rounding {state_pick.rounding}"]
    return {"recipe": recipe, "max_ppl_increase": max_ppl_increase, "quantized_groups": chosen,
            "kept_groups": kept + ["lm_head"], "state": state_pick.to_dict(), "result": final, "trail": trail,
            "quantize_options": " ".join(options),
            "within_budget": math.isfinite(final["ppl_increase"]) and final["ppl_increase"] <= max_ppl_increase}
