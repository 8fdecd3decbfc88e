"""Recall accuracy of an MQAR-trained model with its recurrent state stored in each format.

Every token, pairs included, goes through the decode path (the state is stored in its format between every
two tokens), the harshest setting a server meets: a long conversation decoded turn by turn. Longer contexts
lengthen the noise between the pairs and the queries, so the state must hold the pairs across more stores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gdn2q.errors import ConfigError
from gdn2q.eval.stream import StreamRun, stacked_state, state_bytes
from gdn2q.recall.data import IGNORE, MQARSpec, mqar_batch


def task_of(model: nn.Module) -> dict:
    """The MQAR task a model was trained on (config.json's ``mqar`` section, written by tools/train_mqar.py)."""
    info = model.config.extra.get("mqar")
    if not info:
        raise ConfigError(f"{getattr(model, 'source_path', 'model')}: not an MQAR recall model (its config.json has "
                          "no 'mqar' section); use the bundled one (gdn2q/assets/mqar) or tools/train_mqar.py")
    return info


def bundled_recall_model_path():
    from importlib import resources
    from pathlib import Path

    return Path(str(resources.files("gdn2q") / "assets" / "mqar"))


@torch.no_grad()
def recall_eval(model: nn.Module, runs: list[StreamRun], lengths: list[int] | None = None, sequences: int = 64,
                num_pairs: int | None = None, seed: int = 0, segment: int = 256,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Accuracy per run and context length (same sequences for every run), plus the accuracy of fp32-state
    forwards of ``segment`` tokens (the state stored only between segments: the prefill reference).

    ``lengths`` default: the trained length times 1, 2, 4 and 8. Each length is fed ``segment`` tokens per
    forward (the state carries over; memory stays flat at any length).
    """
    info = task_of(model)
    spec = MQARSpec(info["num_keys"], info["num_values"], info["num_noise"])
    pairs = num_pairs or info["num_pairs"]
    lengths = lengths or [info["trained_length"] * m for m in (1, 2, 4, 8)]
    gen = torch.Generator().manual_seed(seed)
    by_run = {run.name: {"state": run.fmt.to_dict(), "state_bytes_per_layer": state_bytes(model.config, run.fmt),
                         "accuracy": {}} for run in runs}
    full_forward = {}
    for step, length in enumerate(lengths):
        ids, labels = mqar_batch(spec, sequences, length, pairs, gen)
        mask = labels != IGNORE
        ref_state = model.new_state(sequences)
        ref = torch.cat([model(ids[:, s:s + segment], ref_state).argmax(-1) for s in range(0, length, segment)], 1)
        full_forward[length] = float((ref[mask] == labels[mask]).float().mean())
        state = stacked_state(model, [r.fmt for r in runs], seed, rows=sequences)
        rows = ids.repeat(len(runs), 1)
        preds = torch.cat([model(rows[:, s:s + segment], state).argmax(-1) for s in range(0, length, segment)], 1)
        hits = (preds.view(len(runs), sequences, length) == labels)[:, mask]
        for run, h in zip(runs, hits, strict=True):
            by_run[run.name]["accuracy"][length] = float(h.float().mean())
        if progress:
            progress(step + 1, len(lengths))
    return {"task": {**info, "num_pairs": pairs}, "sequences": sequences, "queries_per_length": sequences * pairs,
            "lengths": lengths, "full_forward_fp32": full_forward, "runs": by_run}
