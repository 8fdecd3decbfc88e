"""Reproduce the shipped MQAR recall model (gdn2q/assets/mqar): train, evaluate, write an fla-layout folder.

The shipped checkpoint was trained in two curriculum phases on one H200 (train_log_phase1/2.json beside it hold
each phase's command, log and evaluation). Phase 1 was stopped by its time budget after 654 steps, so to
reproduce it without depending on the clock, pass --stop-after:

    PYTHONPATH=$PWD python3 tools/train_mqar.py --device cuda --max-steps 3000 --stop-after 654 \\
        --time-budget 1e9 --out phase1
    PYTHONPATH=$PWD python3 tools/train_mqar.py --device cuda --init phase1 --stages 8,12,16,20,24 --lr 1e-3 \\
        --max-steps 1000 --time-budget 1e9 --out mqar

Phase 1 learns up to 8 pairs (a straight run at the final pair count stays at chance); phase 2 moves on as
each stage reaches 95% train accuracy. The folder records the largest pair count recalled at >= 90% at the
trained length as ``mqar.num_pairs`` in config.json. CPU smoke run (minutes, no useful accuracy):
    python tools/train_mqar.py --device cpu --batch 8 --max-steps 3 --stages 2 --length 32 --out /tmp/mqar
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gdn2q.checkpoint import Checkpoint, read_checkpoint, save_fla_folder
from gdn2q.recall.data import MQARSpec, mqar_batch
from gdn2q.recall.train import TrainSettings, mqar_config, recall_accuracy, settings_dict, train_mqar


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write (refused if it exists, unless --force)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--stages", default="4,8,16,24,32", help="curriculum: max pairs per stage, comma-separated")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--time-budget", type=float, default=240.0, help="stop training after this many seconds")
    p.add_argument("--stop-after", type=int, help="stop after this many steps (the LR schedule spans --max-steps)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, help="continue from this folder's weights (a previous curriculum phase)")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False   # train in true fp32: the shipped weights are evaluated on CPU
    spec = MQARSpec()
    stages = tuple(int(s) for s in a.stages.split(","))
    settings = TrainSettings(length=a.length, stages=stages, batch=a.batch, lr=a.lr, max_steps=a.max_steps,
                             time_budget_s=a.time_budget, stop_after=a.stop_after, seed=a.seed, spec=spec)
    mqar_info = {"task": "mqar", "trained_length": a.length, "num_pairs": stages[-1],
                 "num_keys": spec.num_keys, "num_values": spec.num_values, "num_noise": spec.num_noise}
    config = mqar_config(spec, a.hidden, a.layers, a.heads, a.head_dim, extra={"mqar": mqar_info})
    t0 = time.perf_counter()
    init = read_checkpoint(a.init).tensors if a.init else None
    model, history = train_mqar(settings, config, a.device, log=lambda e: print(json.dumps(e), flush=True),
                                init=init)
    train_seconds = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(12345)

    def accuracy(length: int, pairs: int) -> float:
        ids, labels = mqar_batch(spec, 256, length, pairs, gen)
        with torch.no_grad():   # full-sequence fp32 forward: the reference the state-quantization eval uses
            return recall_accuracy(model(ids.to(a.device)), labels.to(a.device))

    by_pairs = {n: accuracy(a.length, n) for n in stages}
    # the task the model is shipped for: the most pairs it recalls at >= 90% at the trained length
    solved = max((n for n, acc in by_pairs.items() if acc >= 0.9), default=stages[0])
    mqar_info["num_pairs"] = solved
    by_length = {a.length * m: accuracy(a.length * m, solved) for m in (1, 2, 4, 8)}
    print(json.dumps({"accuracy_by_pairs": by_pairs, "num_pairs": solved, "accuracy_by_length": by_length}),
          flush=True)
    config = config.replace(extra={"mqar": mqar_info})
    model = model.cpu()
    result = {"accuracy_by_pairs": by_pairs, "num_pairs": solved, "accuracy_by_length": by_length,
              "train_seconds": train_seconds, "init": str(a.init) if a.init else None,
              "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "settings": settings_dict(settings), "command": " ".join(sys.argv),
              "history": history}
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_fla_folder(Checkpoint(a.out, "fla", config, tensors), a.out, force=a.force)
    (a.out / "train_log.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
