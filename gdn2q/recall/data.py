"""MQAR sequences: key-value pairs, then noise, then every key queried once (Zoology's multi-query recall).

Layout of one sequence of ``length`` tokens with N pairs:
``k1 v1 k2 v2 ... kN vN | noise x (length - 4N) | q1 a1 q2 a2 ... qN aN`` where the queries are the N keys in
a random order and each answer is the value paired with that key. The model must predict ``a_i`` at the
position of ``q_i``; every other position is ignored (label -100). Keys, values and noise come from disjoint
id ranges, so a noise token can never be mistaken for a key. Longer contexts only lengthen the noise gap,
which is what tests whether the recurrent state holds the pairs over distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gdn2q.errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class MQARSpec:
    """Token id ranges of the task: id 0 is unused, then keys, values and noise tokens."""

    num_keys: int = 192
    num_values: int = 192
    num_noise: int = 127

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values + self.num_noise

    @property
    def key_start(self) -> int:
        return 1

    @property
    def value_start(self) -> int:
        return 1 + self.num_keys

    @property
    def noise_start(self) -> int:
        return 1 + self.num_keys + self.num_values


def mqar_batch(spec: MQARSpec, batch: int, length: int, num_pairs: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [batch, length], labels [batch, length]) with labels set only at the N query positions."""
    if num_pairs > spec.num_keys:
        raise DataError(f"{num_pairs} pairs need at least as many key ids; the task has {spec.num_keys}")
    gap = length - 4 * num_pairs
    if gap < 0:
        raise DataError(f"length {length} is too short for {num_pairs} pairs (needs >= {4 * num_pairs})")
    g = generator
    keys = torch.rand(batch, spec.num_keys, generator=g).argsort(-1)[:, :num_pairs] + spec.key_start
    values = torch.randint(spec.value_start, spec.value_start + spec.num_values, (batch, num_pairs), generator=g)
    pairs = torch.stack([keys, values], dim=-1).flatten(1)                          # k1 v1 k2 v2 ...
    order = torch.rand(batch, num_pairs, generator=g).argsort(-1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=-1).flatten(1)
    noise = torch.randint(spec.noise_start, spec.vocab_size, (batch, gap), generator=g)
    ids = torch.cat([pairs, noise, queries], dim=1)
    labels = torch.full_like(ids, IGNORE)
    q_pos = 2 * num_pairs + gap + 2 * torch.arange(num_pairs)
    labels[:, q_pos] = ids[:, q_pos + 1]
    return ids, labels


def query_start(length: int, num_pairs: int) -> int:
    """Index of the first query token (everything before it is pairs and noise)."""
    return length - 2 * num_pairs
