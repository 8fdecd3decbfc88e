"""Token-level agreement between a base and a candidate model: perplexity, KL(base||candidate), top-1.

Every statistic is accumulated per scored token (the next-token prediction at each position of a window),
so the same numbers are also reported by position bucket, which shows drift along the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KL_QUANTILE = 0.999


def token_stats(base_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token NLL of both models, KL(base || candidate) and top-1 agreement; logits [..., V], targets [...]."""
    lp = base_logits.float().log_softmax(-1)
    lq = cand_logits.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
    t = targets.unsqueeze(-1)
    return {"base_nll": -lp.gather(-1, t).squeeze(-1), "cand_nll": -lq.gather(-1, t).squeeze(-1), "kl": kl,
            "agree": (lp.argmax(-1) == lq.argmax(-1)).float()}


@dataclass
class AgreementMeter:
    """Accumulates :func:`token_stats` of windows [B, T] and reports totals and position buckets."""

    bucket: int
    values: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {k: [] for k in
                                                                           ("base_nll", "cand_nll", "kl", "agree")})

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.values[k].append(v.detach().double().cpu())

    def result(self) -> dict:
        cat = {k: torch.cat(v) for k, v in self.values.items()}          # [N, T] per statistic
        kl = cat["kl"].flatten()
        out = {
            "base": {"ppl": math.exp(cat["base_nll"].mean().item()), "nll": cat["base_nll"].mean().item()},
            "candidate": {"ppl": math.exp(cat["cand_nll"].mean().item()), "nll": cat["cand_nll"].mean().item()},
            "kl_mean": kl.mean().item(),
            "kl_p999": torch.quantile(kl, KL_QUANTILE).item(),
            "top1_agreement": cat["agree"].mean().item(),
            "tokens": kl.numel(),
        }
        out["ppl_increase"] = out["candidate"]["ppl"] / out["base"]["ppl"] - 1.0
        T = cat["kl"].shape[1]
        out["by_position"] = [
            {"start": s, "end": min(s + self.bucket, T),
             "kl_mean": cat["kl"][:, s:s + self.bucket].mean().item(),
             "top1_agreement": cat["agree"][:, s:s + self.bucket].mean().item(),
             "base_ppl": math.exp(cat["base_nll"][:, s:s + self.bucket].mean().item()),
             "candidate_ppl": math.exp(cat["cand_nll"][:, s:s + self.bucket].mean().item())}
            for s in range(0, T, self.bucket)]
        return out
