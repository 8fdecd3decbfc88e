"""The quantized folder: config.json (with a ``quantization`` section) + model.safetensors [+ tokenizer.json].

torchao tensor subclasses are stored flattened by torchao's own safetensors support (inner tensors as
``<module>._weight_<part>``, their attributes as JSON in the safetensors metadata); bitsandbytes modules are
stored as their state dicts (codes plus quant state, all plain tensors); calibrated static state scales as
``state_scales.<layer>``. Reloading gives bit-identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gdn2q.checkpoint import Checkpoint, fla
from gdn2q.checkpoint.io import atomic_dir, read_safetensors, write_safetensors
from gdn2q.checkpoint.summary import group_sizes, summarize
from gdn2q.config import GDN2Config
from gdn2q.errors import CheckpointError
from gdn2q.quant.apply import keep_layout_stable, replace_module
from gdn2q.quant.libs import quant_libs
from gdn2q.quant.state import StateQuantConfig

SECTION = "quantization"
STATE_SCALES = "state_scales."
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP32_PARAMS = ("A_log", "dt_bias")
INT4_PACKED = "gdn2q_int4_packed"   # metadata key: qdata tensors stored two int4 codes per byte


def _int4_qdata_keys(meta: dict[str, str]) -> list[str]:
    """Flattened qdata keys of torchao int4 tensors whose codes torchao keeps one per int8 (its CPU path)."""
    keys = []
    for name in json.loads(meta["tensor_names"]):
        info = json.loads(meta[name])
        if info.get("_type") == "IntxUnpackedToInt8Tensor" and \
                info["_data"].get("target_dtype", {}).get("_data") == "int4":
            fqn, leaf = name.rsplit(".", 1)
            keys.append(f"{fqn}._{leaf}_qdata")
    return keys


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], last dim even -> uint8, two codes a byte (written by hand: torchao's int4 CPU
    tensor has no packed layout in this version, and its opaque CPU formats need kernels this build lacks)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo, hi = (p & 0xF).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """bitsandbytes parameter subclasses -> plain tensors (torchao subclasses pass through)."""
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES

    if type(t).__name__ in ALLOWED_TENSORS_SUBCLASSES or type(t) is torch.Tensor:
        return t
    return t.detach().as_subclass(torch.Tensor)


def save_quantized_folder(model: nn.Module, out: str | Path, source_path: str | Path | None = None,
                          force: bool = False) -> Path:
    """Write a model returned by :func:`gdn2q.quant.quantize_model` as a self-describing folder (atomically)."""
    quant_libs()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    section = getattr(model, "quantization", None)
    if section is None:
        raise CheckpointError("this model is not quantized (no quantization section); run quantize_model first")
    if source_path is not None:
        section = {**section, "source": {**section["source"], "path": str(Path(source_path).resolve())}}
    sd = {k: _plain(v.detach().cpu()) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for i, s in model.state_scales.items():
        sd[f"{STATE_SCALES}{i}"] = s.detach().float().cpu()
    tensors, meta = flatten_tensor_state_dict(sd)
    packed = _int4_qdata_keys(meta)
    for k in packed:
        tensors[k] = pack_int4(tensors[k])
    meta[INT4_PACKED] = json.dumps(packed)
    out = Path(out)
    with atomic_dir(out, force) as tmp:
        (tmp / fla.CONFIG).write_text(json.dumps({**model.config.to_dict(), SECTION: section}, indent=2) + "\n")
        write_safetensors(tensors, tmp / fla.WEIGHTS, metadata={"format": "pt", **meta})
        tok = getattr(model, "tokenizer_path", None)
        if tok is not None and Path(tok).is_file():
            (tmp / fla.TOKENIZER).write_bytes(Path(tok).read_bytes())
    return out


def read_section(path: Path) -> tuple[GDN2Config, dict]:
    d = fla.read_config_dict(path)
    section = d.pop(SECTION, None)
    if not isinstance(section, dict) or "recipe" not in section:
        raise CheckpointError(f"{path / fla.CONFIG}: no valid '{SECTION}' section; not a gdn2q quantized folder")
    return GDN2Config.from_dict(d, source=str(path / fla.CONFIG)), section


def _bnb_module(layer: nn.Linear, kind: str, name: str, sd: dict[str, torch.Tensor], dtype: torch.dtype):
    """Rebuild a bitsandbytes module from its stored codes and quant state (keys popped from ``sd``)."""
    import bitsandbytes as bnb

    own = {k[len(name) + 1:]: sd.pop(k) for k in [k for k in sd if k.startswith(name + ".")]}
    bias = own.pop("bias", None)
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                has_fp16_weights=False, threshold=0.0, device="meta")
        w = bnb.nn.Int8Params(own["weight"], requires_grad=False, has_fp16_weights=False)
        w.CB, w.SCB = w.data, own["SCB"]
        q.weight = w
    else:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None,
                              compute_dtype=dtype, quant_type=kind, device="meta")
        stats = {k[len("weight."):]: v for k, v in own.items() if k.startswith("weight.")}
        q.weight = bnb.nn.Params4bit.from_prequantized(data=own["weight"], quantized_stats=stats,
                                                       requires_grad=False, device="cpu")
    if bias is not None:
        q.bias = nn.Parameter(bias, requires_grad=False)
    keep_layout_stable(q)
    return q


def load_quantized_folder(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a gdn2q quantized folder. It runs in the dtype it was quantized in (its section's ``dtype``);
    ``dtype`` is accepted for the ``load_model`` signature and ignored."""
    from gdn2q.model import GDN2ForCausalLM
    from gdn2q.quant.recipes import get_recipe

    quant_libs()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    path = Path(path)
    cfg, section = read_section(path)
    recipe = get_recipe(section["recipe"])
    tensors, meta = read_safetensors(path / fla.WEIGHTS)
    if "tensor_names" not in meta:
        raise CheckpointError(f"{path / fla.WEIGHTS}: no tensor index in its metadata; write the folder again "
                              "with gdn2q quantize")
    for k in json.loads(meta.get(INT4_PACKED, "[]")):
        tensors[k] = unpack_int4(tensors[k])
    sd, _ = unflatten_tensor_state_dict(tensors, meta)
    scales = {int(k[len(STATE_SCALES):]): sd.pop(k) for k in [k for k in sd if k.startswith(STATE_SCALES)]}
    with torch.device("meta"):
        model = GDN2ForCausalLM(cfg)
    act_dtype = TORCH_DTYPES.get(section.get("dtype"), torch.float32)
    rebuilt = tuple(f"{n}." for n in section["policy"]["quantized"]) if recipe.bnb else ()
    for name in rebuilt:
        name = name[:-1]
        replace_module(model, name, _bnb_module(model.get_submodule(name), recipe.bnb, name, sd, act_dtype))
    result = model.load_state_dict(sd, assign=True, strict=False)
    missing = [k for k in result.missing_keys
               if not (k.startswith(rebuilt) if rebuilt else False) and
               not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        raise CheckpointError(f"{path / fla.WEIGHTS}: {what}; the folder is incomplete or from another model: "
                              "quantize again")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    model.to(device).eval().requires_grad_(False)
    model.source_path = path
    model.tokenizer_path = path / fla.TOKENIZER if (path / fla.TOKENIZER).is_file() else None
    model.quantization = section
    model.state_format = StateQuantConfig(**section.get("state", {}))
    model.state_scales = {i: s.to(device) for i, s in scales.items()}
    return model


def _source_skeleton(cfg: GDN2Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta tensors of the unquantized model in the source precision (decay parameters in fp32)."""
    from gdn2q.model import GDN2ForCausalLM

    with torch.device("meta"):
        model = GDN2ForCausalLM(cfg)
    return {k: v.to(torch.float32 if k.rsplit(".", 1)[-1] in FP32_PARAMS else dtype)
            for k, v in model.state_dict().items()}


def summarize_quantized(path: str | Path) -> dict:
    """What ``gdn2q inspect`` shows: the summary of the source model plus ``bytes_after`` per weight group."""
    path = Path(path)
    cfg, section = read_section(path)
    before = _source_skeleton(cfg, TORCH_DTYPES.get(section.get("dtype"), torch.float32))
    if cfg.tie_word_embeddings:
        before.pop("lm_head.weight", None)
    tok = path / fla.TOKENIZER
    info = summarize(Checkpoint(path, "gdn2q-quantized", cfg, before, tok if tok.is_file() else None, {}))
    stored, _ = read_safetensors(path / fla.WEIGHTS)
    attn_layers = frozenset(cfg.attn.layers) if cfg.attn else frozenset()
    after = group_sizes({k: v for k, v in stored.items() if not k.startswith(STATE_SCALES)}, attn_layers)
    for name, g in info["groups"].items():
        g["bytes_after"] = after.get(name, {}).get("bytes", 0)
        g["dtypes_after"] = after.get(name, {}).get("dtypes", [])
    info["bytes_after"] = sum(g["bytes_after"] for g in info["groups"].values())
    info["state_scales_bytes"] = sum(v.numel() * v.element_size() for k, v in stored.items()
                                     if k.startswith(STATE_SCALES))
    info["quantization"] = section
    return info
