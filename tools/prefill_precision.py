"""Which products of the chunked prefill must be more exact than bf16 for an int8 S_T: a CPU emulation.

The five-launch prefill (gdn2q.kernels.prefill) is replayed in float64 on the same factored operands, with the
operands of each group of products rounded as a dot_precision would round them on the tensor cores and the
inter-kernel tensors rounded to their storage dtype. Accumulation is exact here (fp32 on the GPU adds ~2^-24).
Groups: ``score`` (T blocks of the score kernel), ``wy`` (Y = A E, U = A Z), ``read`` (Y S in R = U - Y S),
``write`` (Ktail^T R); stores ``y``, ``u``, ``kt``, ``r`` (the state kernel's inputs and R).
Reported per configuration (max over heads): ``prod`` = max |S_T - exact| in int8 steps of its row
(row absmax / 127), ``exact`` = |dequant(int8 of S_T) - exact| in steps of that grid (0.5 + about ``prod``,
what tools/gpu_check_kernels.py calls state_err_exact), ``rel`` = max |S_T - exact| / max |exact|.

Inputs as tools/gpu_check_kernels.py::check_prefill (``--decay check``: g = -U(0, 0.3), memory ~7 tokens, so
S_T is the last chunk's write) or with slow channels (``--decay slow``: per-channel rates log-uniform in
[1e-3, 0.3], memory up to ~1000 tokens, so errors of the erase read R = U - Y S compound over chunks).
Usage: python tools/prefill_precision.py [--T 8192] [--decay check|slow] [--seed 1] [--configs NAME ...]
"""

from __future__ import annotations

import argparse

import torch

H, K, V, C, SUB = 16, 128, 128, 64, 16
SAFE_DECAY = 60.0


def _tf32(x: torch.Tensor, nearest: bool) -> torch.Tensor:
    """fp32 x with 10 mantissa bits: truncated (plain tf32 tensor-core operands) or rounded (tf32x3's split)."""
    i = x.float().view(torch.int32)
    if nearest:
        i = i + 0x1000
    return (i & ~0x1FFF).view(torch.float32).double()


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def store(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """x as the kernels keep it between launches (every fp32 value is first an fp32 register)."""
    return _bf16(x) if dtype == "bf16" else x.float().double()


def _parts(x: torch.Tensor, prec: str) -> list[torch.Tensor]:
    """The operand terms one tensor-core product sees: [x rounded] or [hi, lo] of a split."""
    if prec == "exact":
        return [x]
    x = x.float().double()
    if prec == "bf16":
        return [_bf16(x)]
    if prec == "tf32":
        return [_tf32(x, False)]
    if prec == "bf16x3":
        hi = _bf16(x)
        return [hi, _bf16(x - hi)]
    if prec == "tf32x3":
        hi = _tf32(x, True)
        return [hi, _tf32(x - hi, True)]
    raise ValueError(f"unknown precision {prec!r}")


def dot(a: torch.Tensor, b: torch.Tensor, prec: str) -> torch.Tensor:
    """a @ b as dot_precision ``prec`` computes it (split products drop only lo @ lo)."""
    pa, pb = _parts(a, prec), _parts(b, prec)
    out = pa[0] @ pb[0]
    if len(pa) == 2:
        out = out + pa[1] @ pb[0] + pa[0] @ pb[1]
    return out


def _blocks_T(bk: torch.Tensor, k: torch.Tensor, g: torch.Tensor, prec: str) -> torch.Tensor:
    """Strict lower T[i, j] = sum (b k)_i k_j exp(G_i - G_j) as the score kernel factors it (GDN2_SPEC.md 2).

    Row block I (16 rows) is one product of (b k)_i exp(gl_i) and k_j exp(S_I - G_j) from in-block cumulative
    decays gl: k_j exp(-gl_j) on the diagonal block, k_j exp(bs_J - gl_j) exp(blocks between) for earlier blocks
    J. Diagonal blocks where a channel decays by more than SAFE_DECAY use exact pairwise exponents instead.
    """
    sh = g.shape[:-2]
    gl = g.float().reshape(*sh, C // SUB, SUB, -1).cumsum(-2).reshape(g.shape).double()   # fp32, as the kernel
    bs = gl[..., SUB - 1::SUB, :]                                                         # block decays
    blk = torch.arange(C) // SUB
    kend = k * (bs[..., blk, :] - gl).exp()
    kdiag = k * (-gl).clamp_max(SAFE_DECAY).exp()
    strict = torch.tril(torch.ones(C, C, dtype=torch.bool), -1)
    Tm = torch.zeros(*sh, C, C, dtype=torch.float64)
    for i in range(C // SUB):
        rows = slice(i * SUB, (i + 1) * SUB)
        right = torch.zeros_like(k)
        right[..., rows, :] = kdiag[..., rows, :]
        for j in range(i):
            cols = slice(j * SUB, (j + 1) * SUB)
            right[..., cols, :] = kend[..., cols, :] * bs[..., j + 1:i, :].sum(-2, keepdim=True).exp()
        Tm[..., rows, :] = dot(bk[..., rows, :] * gl[..., rows, :].exp(), right.transpose(-1, -2), prec)
        bad = (-bs[..., i, :]).amax(-1) >= SAFE_DECAY
        if bad.any():
            gb = gl[..., rows, :][bad]
            e = (gb.unsqueeze(-2) - gb.unsqueeze(-3)).masked_fill(~strict[:SUB, :SUB].unsqueeze(-1),
                                                                  float("-inf")).exp()
            blk_t = Tm[..., rows, rows].clone()
            blk_t[bad] = torch.einsum("bik,bjk,bijk->bij", bk[..., rows, :][bad], k[..., rows, :][bad], e)
            Tm[..., rows, rows] = blk_t
    return (Tm * strict).float().double()


def inputs(T: int, decay: str, seed: int) -> dict[str, torch.Tensor]:
    """[H, T, D] float64 tensors (q unused: S_T does not depend on it) and the initial state [H, K, V]."""
    gen = torch.Generator().manual_seed(seed)

    def r(d):
        return torch.randn(T, H, d, generator=gen)

    k, v = r(K).bfloat16(), r(V).bfloat16()
    if decay == "check":
        g = -torch.rand(T, H, K, generator=gen) * 0.3
        g[100:140, :2] = -25.0
    else:
        rate = torch.exp(torch.empty(H, K).uniform_(torch.log(torch.tensor(1e-3)).item(),
                                                    torch.log(torch.tensor(0.3)).item(), generator=gen))
        g = -rate * 2 * torch.rand(T, H, K, generator=gen)
    b, w = r(K).sigmoid().bfloat16(), r(V).sigmoid().bfloat16()
    s0 = torch.randn(H, K, V, generator=gen) * 3
    sc = s0.abs().amax(-1, keepdim=True) / 127
    s0 = torch.round(s0 / sc) * sc                                       # a stored int8 state, as the check's
    kf = k.double()
    kf = kf * torch.rsqrt((kf * kf).sum(-1, keepdim=True) + 1e-6)
    out = {n: x.double().transpose(0, 1) for n, x in (("k", kf), ("v", v), ("g", g), ("b", b), ("w", w))}
    out["s0"] = s0.double()
    return out


def simulate(x: dict[str, torch.Tensor], cfg: dict[str, str]) -> torch.Tensor:
    """S_T [H, K, V] of the chunked prefill with the roundings of ``cfg`` (absent keys: exact / fp32)."""
    T = x["k"].shape[1]
    pad = (-T) % C
    N = (T + pad) // C

    def chunks(t):
        return torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(H, N, C, t.shape[-1])

    k, v, g, b, w = (chunks(x[n]) for n in ("k", "v", "g", "b", "w"))
    G = g.float().cumsum(-2).double()                                   # fp32 cumsum, as the WY kernel
    bk = b * k
    Tm = _blocks_T(bk, k, g, cfg.get("score", "exact"))
    A = torch.linalg.inv(Tm + torch.eye(C, dtype=torch.float64)).float().double()
    Y = store(dot(A, bk * G.exp(), cfg.get("wy", "exact")), cfg.get("y", "fp32"))
    U = store(dot(A, w * v, cfg.get("wy", "exact")), cfg.get("u", "fp32"))
    Kt = store(k * (G[..., -1:, :] - G).exp(), cfg.get("kt", "fp32")).transpose(-1, -2)
    gc = G[..., -1, :].exp().float().double().unsqueeze(-1)
    S = x["s0"]
    read, write, rs = cfg.get("read", "exact"), cfg.get("write", "exact"), cfg.get("r", "fp32")
    for n in range(N):
        R = store(U[:, n] - dot(Y[:, n], S, read), rs)
        S = (S * gc[:, n] + dot(Kt[:, n], R, write)).float().double()
    return S


def metrics(S: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    step = S.abs().amax(-1, keepdim=True) / 127
    deq = torch.round(S / step) * step
    return {"prod": ((S - exact).abs() / step).max().item(),
            "exact": ((deq - exact).abs() / step).max().item(),
            "rel": ((S - exact).abs().max() / exact.abs().max()).item()}


_MIXED = {"score": "bf16", "wy": "bf16x3", "read": "bf16", "write": "bf16x3", "y": "bf16"}   # the kernel's
_BF16_STORES = {"y": "bf16", "u": "bf16", "kt": "bf16", "r": "bf16"}
CONFIGS: dict[str, dict[str, str]] = {
    # the kernel's dot_precision options as they run now
    "bf16": {"score": "tf32", "wy": "tf32", "read": "bf16", "write": "bf16", **_BF16_STORES},
    "mixed": _MIXED,
    "bf16x3": {"score": "tf32x3", "wy": "tf32x3", "read": "bf16x3", "write": "bf16x3"},
    "tf32x3": {"score": "tf32x3", "wy": "tf32x3", "read": "tf32x3", "write": "tf32x3"},
    # one group low, everything else exact: who contributes what
    "only score tf32": {"score": "tf32"},
    "only score bf16": {"score": "bf16"},
    "only wy tf32": {"wy": "tf32"},
    "only Y,U stored bf16": {"y": "bf16", "u": "bf16"},
    "only Ktail stored bf16": {"kt": "bf16"},
    "only R stored bf16": {"r": "bf16"},
    "only read bf16": {"read": "bf16"},
    "only write bf16": {"write": "bf16"},
    "only state products bf16 (fp32 stores)": {"read": "bf16", "write": "bf16"},
    "mixed-split": {**_MIXED, "score": "tf32", "read": "bf16x3", "y": "fp32"},
    # around "mixed": cheaper ones
    "mixed, wy tf32": {**_MIXED, "wy": "tf32"},
    "mixed, write tf32": {**_MIXED, "write": "tf32"},
    "mixed, wy + write tf32": {**_MIXED, "wy": "tf32", "write": "tf32"},
    "mixed, U bf16": {**_MIXED, "u": "bf16"},
    "mixed, Ktail bf16": {**_MIXED, "kt": "bf16"},
    "state bf16x3 + fp32 stores, rest tf32": {"score": "tf32", "wy": "tf32", "read": "bf16x3", "write": "bf16x3"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--decay", choices=("check", "slow"), default="check")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="names from CONFIGS")
    a = ap.parse_args()
    x = inputs(a.T, a.decay, a.seed)
    exact = simulate(x, {})
    print(f"| T={a.T}, decay {a.decay}, seed {a.seed} | prod (steps) | exact (steps) | fp32 rel |")
    print("|---|---|---|---|")
    for name in a.configs:
        m = metrics(simulate(x, CONFIGS[name]), exact)
        print(f"| {name} | {m['prod']:.3f} | {m['exact']:.3f} | {m['rel']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
