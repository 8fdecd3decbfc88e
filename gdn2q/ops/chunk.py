"""Chunked (WY) form of the GDN-2 recurrence, chunk 64 (GDN2_SPEC.md 2): what prefill and training use.

Inside a chunk the T token updates collapse to one unit-lower-triangular solve and a few matmuls, so the
sequential work drops from T steps to T/64. Decay factors exp(G_i - G_j) are never formed as a quotient
gamma_i / gamma_j (that overflows when a chunk decays strongly): 16-token diagonal blocks use exact pairwise
exponents, off-diagonal blocks are split at the end of the earlier block so both factors are <= 1.
"""

from __future__ import annotations

import torch

from gdn2q.ops.naive import prepare_qk

CHUNK = 64
SUB = 16


def _decayed_scores(a: torch.Tensor, c: torch.Tensor, G: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """M[i, j] = sum_k a_i[k] c_j[k] exp(G_i[k] - G_j[k]) for j < i (j <= i if inclusive), else 0.

    a, c, G: [..., C, K] with G the within-chunk cumulative log decay (non-increasing along C).
    """
    C = a.shape[-2]
    nb = C // SUB
    M = a.new_zeros(*a.shape[:-2], C, C)
    diag_mask = torch.tril(torch.ones(SUB, SUB, dtype=torch.bool, device=a.device), 0 if inclusive else -1)
    for I in range(nb):
        rows = slice(I * SUB, (I + 1) * SUB)
        ai, Gi = a[..., rows, :], G[..., rows, :]
        # diagonal block: exact pairwise exponents, only for pairs j <= i (the exponent is then <= 0)
        e = (Gi.unsqueeze(-2) - Gi.unsqueeze(-3)).masked_fill(~diag_mask.unsqueeze(-1), float("-inf"))
        M[..., rows, rows] = torch.einsum("...ik,...jk,...ijk->...ij", ai, c[..., rows, :], e.exp())
        for J in range(I):
            cols = slice(J * SUB, (J + 1) * SUB)
            ref = G[..., (J + 1) * SUB - 1: (J + 1) * SUB, :]         # end of block J: both factors <= 1
            left = ai * (Gi - ref).exp()
            right = c[..., cols, :] * (ref - G[..., cols, :]).exp()
            M[..., rows, cols] = left @ right.transpose(-1, -2)
    return M


def chunk_gdn2(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    initial_state: torch.Tensor | None = None, scale: float | None = None, use_qk_l2norm: bool = True,
    chunk_size: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`gdn2q.ops.naive.recurrent_gdn2`, computed chunk by chunk (WY form)."""
    if chunk_size % SUB:
        raise ValueError(f"chunk_size must be a multiple of {SUB}")
    B, T, HV, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    qf, kf = prepare_qk(q, k, scale, use_qk_l2norm)
    vf, gf, bf, wf = v.float(), g.float(), b.float(), w.float()
    pad = (-T) % C
    if pad:  # padded tokens: zero k, v and decay leave the state and earlier outputs untouched
        def padt(x):
            return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        qf, kf, vf, gf, bf, wf = map(padt, (qf, kf, vf, gf, bf, wf))
    N = (T + pad) // C

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, N, C, D]
        return x.transpose(1, 2).reshape(B, HV, N, C, x.shape[-1])

    qc, kc, vc, gc, bc, wc = map(chunks, (qf, kf, vf, gf, bf, wf))
    G = gc.cumsum(-2)                                             # within-chunk cumulative log decay
    bk = bc * kc
    # (I + T) with T[i, j] = sum_k (b k)_i k_j exp(G_i - G_j), j < i; solve once for Y = A E and U = A Z
    Tm = _decayed_scores(bk, kc, G, inclusive=False)
    eye = torch.eye(C, dtype=Tm.dtype, device=Tm.device)
    rhs = torch.cat([bk * G.exp(), wc * vc], dim=-1)              # E = gamma * b * k, Z = w * v
    sol = torch.linalg.solve_triangular(Tm + eye, rhs, upper=False, unitriangular=True)
    Y, U = sol[..., :K], sol[..., K:]
    Aqk = _decayed_scores(qc, kc, G, inclusive=True)
    q_in = qc * G.exp()                                           # queries decayed to the chunk start
    G_last = G[..., -1:, :]
    k_tail = kc * (G_last - G).exp()                              # keys decayed to the chunk end
    gamma_last = G_last.exp().transpose(-1, -2)                   # [B, H, N, K, 1]

    S = q.new_zeros(B, HV, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for n in range(N):
        R = U[:, :, n] - Y[:, :, n] @ S                           # residual write after erasing S's read
        outs.append(q_in[:, :, n] @ S + Aqk[:, :, n] @ R)
        S = gamma_last[:, :, n] * S + k_tail[:, :, n].transpose(-1, -2) @ R
    o = torch.stack(outs, dim=2).reshape(B, HV, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(v.dtype), S
