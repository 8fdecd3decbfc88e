"""Train a small GDN-2 on MQAR with a curriculum over the number of key-value pairs.

A straight run at the hardest setting stays at chance (the loss gives no signal until the model can store a
few pairs), so training starts with few pairs and moves to more once the current stage is learned. Each step
draws its pair count up to the stage's maximum, so the noise gap (length - 4N) varies too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from gdn2q.config import GDN2Config
from gdn2q.model import GDN2ForCausalLM
from gdn2q.recall.data import IGNORE, MQARSpec, mqar_batch


@dataclass
class TrainSettings:
    length: int = 256
    stages: tuple[int, ...] = (4, 8, 16, 24, 32)   # max pairs per curriculum stage; the last is the target
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    max_steps: int = 4000
    min_stage_steps: int = 100
    advance_at: float = 0.95                        # train accuracy that moves the curriculum on
    time_budget_s: float = 240.0
    stop_after: int | None = None                   # stop after this many steps (the schedule still spans max_steps)
    log_every: int = 50
    seed: int = 0
    spec: MQARSpec = field(default_factory=MQARSpec)


def mqar_config(spec: MQARSpec, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                head_dim: int = 64, extra: dict | None = None) -> GDN2Config:
    """A small all-GDN-2 model (no attention layers, so recall depends on the recurrent state alone)."""
    return GDN2Config(hidden_size=hidden_size, num_hidden_layers=num_layers, num_heads=num_heads,
                      head_dim=head_dim, vocab_size=spec.vocab_size, intermediate_size=2 * hidden_size,
                      max_position_embeddings=8192, extra=extra or {})


def init_weights(model: GDN2ForCausalLM, generator: torch.Generator) -> None:
    """fla's initialisation (GDN2_SPEC.md notes): N(0, 0.02) weights, A_log = log U(1, 16),
    dt_bias = softplus^-1 of log-uniform(1e-3, 1e-1)."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            if leaf == "A_log":
                p.copy_(torch.empty_like(p).uniform_(1, 16, generator=generator).log())
            elif leaf == "dt_bias":
                lo, hi = math.log(1e-3), math.log(1e-1)
                dt = torch.empty_like(p).uniform_(lo, hi, generator=generator).exp().clamp_min(1e-4)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))            # inverse softplus
            elif leaf == "bias" or "norm" in name:
                continue
            elif p.dim() >= 2 and "conv1d" not in name:
                p.normal_(0.0, 0.02, generator=generator)


def recall_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    mask = labels != IGNORE
    return float((logits.argmax(-1)[mask] == labels[mask]).float().mean())


def train_mqar(settings: TrainSettings, config: GDN2Config, device: str = "cpu",
               log: Callable[[dict], None] = print,
               init: dict[str, torch.Tensor] | None = None) -> tuple[GDN2ForCausalLM, list[dict]]:
    """Train from scratch (or continue from ``init`` weights, e.g. an earlier curriculum phase).

    Returns the model (eval mode, on ``device``) and the per-log-step history.
    """
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    model = GDN2ForCausalLM(config)
    init_weights(model, gen)
    if init is not None:
        model.load_state_dict(init, strict=True)
    model.to(device).train()
    model.set_recurrence("chunk")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embeddings" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    stage, stage_steps, history, t0 = 0, 0, [], time.perf_counter()
    ema_acc = 0.0
    for step in range(settings.max_steps):
        frac = step / settings.max_steps
        warm = min(1.0, step / 100)
        for group in opt.param_groups:
            group["lr"] = settings.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        top = settings.stages[stage]
        low = max(1, settings.stages[stage - 1] if stage else 1)
        pairs = int(torch.randint(low, top + 1, (1,), generator=gen))
        ids, labels = mqar_batch(settings.spec, settings.batch, settings.length, pairs, gen)
        ids, labels = ids.to(device), labels.to(device)
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = recall_accuracy(logits.detach(), labels)
        ema_acc = acc if stage_steps == 0 else 0.9 * ema_acc + 0.1 * acc
        stage_steps += 1
        elapsed = time.perf_counter() - t0
        if step % settings.log_every == 0:
            entry = {"step": step, "stage_max_pairs": top, "pairs": pairs, "loss": round(loss.item(), 4),
                     "acc": round(acc, 4), "ema_acc": round(ema_acc, 4), "elapsed_s": round(elapsed, 1)}
            history.append(entry)
            log(entry)
        last = stage == len(settings.stages) - 1
        if not last and stage_steps >= settings.min_stage_steps and ema_acc >= settings.advance_at:
            stage, stage_steps = stage + 1, 0
        if elapsed > settings.time_budget_s:
            log({"stopped": "time budget", "step": step})
            break
        if settings.stop_after is not None and step + 1 >= settings.stop_after:
            log({"stopped": "stop_after", "step": step})
            break
    model.eval().requires_grad_(False)
    return model, history


def settings_dict(settings: TrainSettings) -> dict:
    d = asdict(settings)
    d["stages"] = list(settings.stages)
    return d
