"""Decode speed, file size and accuracy of the ONNX exports on this CPU -> docs/benchmarks/onnx-cpu.{json,md}.

    python tools/bench_onnx.py                      # small fixture, batch 1, 1 thread
    python tools/bench_onnx.py --threads 2 --batch 1 --batch 8

Speed: PyTorch eager fp32 and onnxruntime fp32 / fp16 / int8 / int4 exports, decode steps from the explicit
state (a prompt is prefilled first), plus prompt tokens/s of one 512-token prefill call. Rounds are
interleaved (every variant once per round) and the median round is reported, so load from other processes on
a shared machine hits all variants alike. Accuracy: top-1 agreement and max |logit diff| of every export with
PyTorch fp32 over the first 512 tokens of shakespeare_eval, and `verify_export` (prompt + 64 greedy decode
steps) of the fp32 export of each fixture.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import gdn2q
from gdn2q.data import load_tokenizer, tokenize_file
from gdn2q.export.exporter import export_onnx
from gdn2q.export.runner import OnnxGDN2Runner
from gdn2q.export.verify import verify_export

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "docs" / "benchmarks" / "onnx-cpu"
VARIANTS = [("fp32", "fp32"), ("fp16", "fp32"), ("int8", "fp32"), ("int8", "int8"), ("int4", "int8")]
EVAL_TOKENS = 512
PROMPT_TOKENS = 16


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def torch_decoder(lm, batch: int, prompt: torch.Tensor):
    state = lm.new_state(batch)
    with torch.no_grad():
        logits = lm(prompt, state)[:, -1]

    def step():
        nonlocal logits
        with torch.no_grad():
            logits = lm(logits.argmax(-1, keepdim=True), state)[:, -1]
    return step


def onnx_decoder(runner: OnnxGDN2Runner, batch: int, prompt: np.ndarray):
    logits, state = runner.prefill(prompt)

    def step():
        nonlocal logits
        logits = runner.step(logits.argmax(-1), state)
    return step


def time_steps(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def bench_speed(decoders: dict, batch: int, steps: int, rounds: int, warmup: int) -> dict:
    for step in decoders.values():
        time_steps(step, warmup)
    runs: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, step in decoders.items():
            runs[name].append(batch * steps / time_steps(step, steps))
    return {name: {"tokens_per_s": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
            for name, v in runs.items()}


def accuracy(runner: OnnxGDN2Runner, ids: torch.Tensor, ref: np.ndarray) -> dict:
    """Teacher-forced agreement with PyTorch fp32, one token per call (so an int8 state is re-quantized after
    every token, as in decoding); and the prompt speed of the same text in one prefill call."""
    state = runner.new_state(1)
    got = np.stack([runner.step(ids[:, t].numpy(), state)[0] for t in range(ids.shape[1])])
    t0 = time.perf_counter()
    runner.prefill(ids.numpy())
    dt = time.perf_counter() - t0
    return {"top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
            "max_abs_logit_diff": float(np.abs(got - ref).max()), "tokens": int(ids.shape[1]),
            "prefill_tokens_per_s": ids.shape[1] / dt}


def write_markdown(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = [f"# ONNX decode on CPU: `{res['model']}` fixture", "",
             f"Written by `{res['command']}` on {res['date']}.", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (shared with other work), onnxruntime "
             f"{m['onnxruntime']}, torch {m['torch']}, {res['threads']} intra-op thread(s). Decode tokens/s are the "
             f"median of {res['rounds']} interleaved rounds of {res['steps']} steps after a {PROMPT_TOKENS}-token "
             "prompt; agreement is with PyTorch fp32 over the first "
             f"{EVAL_TOKENS} tokens of shakespeare_eval, teacher-forced one token per call (an int8 state is "
             "re-quantized after every token); the last column is the speed of the same text in one prefill call.",
             ""]
    for batch, speed in res["speed"].items():
        lines += [f"## Batch {batch}", "", "| variant | weights | state | file MB | x smaller | tokens/s "
                  "(min-max) | vs onnxruntime fp32 | top-1 vs PyTorch fp32 | max abs logit diff | prompt tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        base = speed["onnxruntime fp32/fp32"]["tokens_per_s"]
        for name, s in speed.items():
            v = res["variants"].get(name, {})
            size = v.get("onnx_bytes")
            acc = v["accuracy"]
            mb, smaller = ("", "") if size is None else (f"{size / 1e6:.1f}", f"{res['fp32_bytes'] / size:.2f}")
            top1, diff = ((f"{acc['top1_agreement']:.4f}", f"{acc['max_abs_logit_diff']:.3g}")
                          if "top1_agreement" in acc else ("(reference)", "(reference)"))
            lines.append(
                f"| {name} | {v['weights']} | {v['state']} | {mb} | {smaller} | "
                f"{s['tokens_per_s']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | {s['tokens_per_s'] / base:.2f}x | "
                f"{top1} | {diff} | {acc['prefill_tokens_per_s']:.0f} |")
        lines.append("")
    lines += ["## fp32 export vs PyTorch: prompt + 64 greedy decode steps (`verify_export`)", "",
              "| fixture | max abs logit diff | where | greedy tokens equal |", "|---|---|---|---|"]
    for name, v in res["verify_fp32"].items():
        lines.append(f"| {name} | {v['max_abs_diff']:.3g} | {v['where']} | {v['greedy_equal']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="fixture name in ../shared/checkpoints or a path")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT, help="output path without suffix (.json and .md)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the existing .json")
    args = ap.parse_args()
    if args.markdown_only:
        write_markdown(json.loads(args.out.with_suffix(".json").read_text()), args.out.with_suffix(".md"))
        return
    batches = args.batch or [1]
    torch.set_num_threads(args.threads)
    path = SHARED / "checkpoints" / args.model if not Path(args.model).exists() else Path(args.model)
    lm = gdn2q.load_model(path)
    tok = load_tokenizer(lm.tokenizer_path)
    ids = torch.as_tensor(tokenize_file(tok, SHARED / "data/corpus/shakespeare_eval.txt", EVAL_TOKENS,
                                        EVAL_TOKENS)[:EVAL_TOKENS]).view(1, -1)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = lm(ids)[0].numpy()
        torch_prefill = ids.shape[1] / (time.perf_counter() - t0)
    res = {"model": args.model, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python tools/bench_onnx.py " + " ".join(
               [f"--model {args.model}", f"--threads {args.threads}", f"--steps {args.steps}",
                f"--rounds {args.rounds}"] + [f"--batch {b}" for b in batches]),
           "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
           "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(),
                       "onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version()},
           "variants": {"pytorch eager fp32": {"weights": "fp32", "state": "fp32",
                                               "accuracy": {"prefill_tokens_per_s": torch_prefill}}},
           "speed": {}, "verify_fp32": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for weights, state in VARIANTS:
            name = f"onnxruntime {weights}/{state}"
            folder = Path(tmp) / f"{weights}-{state}"
            r = export_onnx(lm, folder, weights=weights, state=state)
            runners[name] = OnnxGDN2Runner(folder, threads=args.threads)
            res["variants"][name] = {"weights": weights, "state": state, "onnx_bytes": r.onnx_bytes,
                                     "accuracy": accuracy(runners[name], ids, ref)}
            print(name, res["variants"][name], flush=True)
        res["fp32_bytes"] = res["variants"]["onnxruntime fp32/fp32"]["onnx_bytes"]
        for batch in batches:
            prompt = ids[:, :PROMPT_TOKENS].expand(batch, -1).contiguous()
            decoders = {"pytorch eager fp32": torch_decoder(lm, batch, prompt)}
            decoders |= {name: onnx_decoder(r, batch, prompt.numpy()) for name, r in runners.items()}
            res["speed"][str(batch)] = bench_speed(decoders, batch, args.steps, args.rounds, args.warmup)
            for name, s in res["speed"][str(batch)].items():
                print(f"batch {batch} {name}: {s['tokens_per_s']:.1f} tokens/s", flush=True)
        for fixture in ("tiny", "tiny-hybrid", "small"):
            fl = gdn2q.load_model(SHARED / "checkpoints" / fixture)
            folder = Path(tmp) / f"verify-{fixture}"
            export_onnx(fl, folder)
            prompt_ids = load_tokenizer(fl.tokenizer_path).encode("ROMEO:").ids
            rep = verify_export(OnnxGDN2Runner(folder, threads=args.threads), fl, prompt_ids, steps=64)
            res["verify_fp32"][fixture] = {k: getattr(rep, k) for k in ("max_abs_diff", "where", "greedy_equal",
                                                                        "top1_agreement", "passed")}
            print(fixture, rep.summary(), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, args.out.with_suffix(".md"))
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
