"""Reports of comparison results: a markdown table, a PNG of drift over position, and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from gdn2q.checkpoint.io import atomic_dir, atomic_file

SUMMARY_COLUMNS = ("candidate", "base ppl", "candidate ppl", "ppl change", "KL mean", "KL p99.9", "top-1 agree",
                   "tokens")


def _summary_row(name: str, r: dict) -> list[str]:
    return [name, f"{r['base']['ppl']:.3f}", f"{r['candidate']['ppl']:.3f}", f"{100 * r['ppl_increase']:+.2f}%",
            f"{r['kl_mean']:.5f}", f"{r['kl_p999']:.4f}", f"{100 * r['top1_agreement']:.2f}%", f"{r['tokens']:,}"]


def summary_rows(results: dict[str, dict]) -> list[list[str]]:
    return [_summary_row(name, r) for name, r in results.items()]


def markdown(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def position_markdown(r: dict) -> str:
    rows = [[f"{b['start']}-{b['end'] - 1}", f"{b['kl_mean']:.5f}", f"{100 * b['top1_agreement']:.2f}%",
             f"{b['base_ppl']:.3f}", f"{b['candidate_ppl']:.3f}"] for b in r["by_position"]]
    return markdown(("positions", "KL mean", "top-1 agree", "base ppl", "candidate ppl"), rows)


def report_markdown(results: dict[str, dict], title: str = "Comparison") -> str:
    parts = [f"# {title}\n", markdown(SUMMARY_COLUMNS, summary_rows(results))]
    for name, r in results.items():
        parts.append(f"\n## {name}: by position (drift)\n")
        parts.append(position_markdown(r))
    return "\n".join(parts)


def plot_drift(results: dict[str, dict], path: Path, *, where: str = "position in window",
               reference: str = "base", title: str = "KL by position", log_kl: bool = False,
               figsize: tuple[float, float] = (10, 4), marker: str = "o", dpi: int = 100) -> None:
    """KL mean and top-1 agreement per position bucket (``by_position``), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_top) = plt.subplots(1, 2, figsize=figsize)
    for name, r in results.items():
        mids = [(b["start"] + b["end"]) / 2 for b in r["by_position"]]
        ax_kl.plot(mids, [b["kl_mean"] for b in r["by_position"]], marker=marker, label=name)
        ax_top.plot(mids, [100 * b["top1_agreement"] for b in r["by_position"]], marker=marker, label=name)
    ax_kl.set(xlabel=where, ylabel=f"KL({reference} || candidate), mean", title=title,
              yscale="log" if log_kl else "linear")
    ax_top.set(xlabel=where, ylabel=f"top-1 agreement with {reference} (%)", title="top-1 agreement by position")
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_json(obj: dict, path: Path, force: bool = False) -> Path:
    with atomic_file(Path(path), force) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def write_report(results: dict[str, dict], folder: Path, force: bool = False, title: str = "Comparison") -> Path:
    """``folder``/report.md, drift.png and compare.json, written together (atomically)."""
    with atomic_dir(Path(folder), force) as tmp:
        (tmp / "report.md").write_text(report_markdown(results, title) + "\n![drift](drift.png)\n")
        plot_drift(results, tmp / "drift.png")
        (tmp / "compare.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return Path(folder)
