"""`gdn2q demo`: the main job end to end on the bundled model, in one command (the README's quick start)."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

from gdn2q.checkpoint import read_checkpoint
from gdn2q.checkpoint.summary import summarize
from gdn2q.cli.app import app, console, guarded
from gdn2q.cli.inspect_model import render
from gdn2q.data import load_tokenizer


@app.command()
@guarded
def demo(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt for the generation step.")] = "KING HENRY:",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 40,
) -> None:
    """Run the main job on the small GDN-2 model bundled with gdn2q: inspect it, then generate with it.

    Example: [bold]gdn2q demo[/]
    """
    from gdn2q import load_model

    console.rule("[bold]1. inspect the bundled model")
    ckpt = read_checkpoint(None)
    render(summarize(ckpt))
    console.rule("[bold]2. generate (prefill, then token-by-token decode from the explicit state)")
    model = load_model()
    tok = load_tokenizer(model.tokenizer_path)
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=max_new_tokens)
    console.print(f"[bold]{prompt}[/]{tok.decode(out[0].tolist())}", highlight=False)
