"""The groups a step trains on: every group of its batch of prompts_per_step prompts, or with dynamic sampling (DAPO,
arXiv 2503.14476 §3.2, Eq. 11) the first prompts_per_step groups whose rewards are not all equal, sampling further
batches of prompts_per_step prompts until that many are found or dynamic_sampling_max_batches batches were drawn.

A group of equal rewards has advantage 0 on every row: it brings no policy gradient, yet its tokens dilute a
token-normalized loss. Every rank samples and scores its contiguous share of each batch; rewards and completions
are gathered, so every rank sees every group in data order (batch, rank, group) and takes the same decisions
with no further agreement. The step's groups are then shared out contiguously, as a batch without dynamic
sampling is: every rank trains as many groups. When the cap is hit first, the step trains on what was found (cut
to a multiple of the world size; none: no update) and says so. Each batch drawn moves the data position on by
prompts_per_step, so a resumed run draws the same prompts (train.run stores the position in the checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed
from .rollout import Rollout
from .run_log import say


@dataclass
class Batch:
    """One sampled batch of prompts_per_step prompts, every rank's rows."""

    roll: Rollout  # every rank's groups in data order, completions padded to the longest
    table: torch.Tensor  # (F + 2, N): each reward function's scores (NaN: none), completion lengths, cut flags
    total: torch.Tensor  # (N,) float32 weighted reward
    texts: tuple[list, list, list]  # this rank's prompts, completions and rewards (samples.jsonl)


def concat(rolls: list[Rollout]) -> Rollout:
    """One Rollout from several, completions padded to the longest (pad id, mask 0)."""
    if len(rolls) == 1:
        return rolls[0]
    Tc, pad = max(r.completion_ids.shape[1] for r in rolls), rolls[0].pad_token_id
    ids = torch.cat([F.pad(r.completion_ids, (0, Tc - r.completion_ids.shape[1]), value=pad) for r in rolls])
    mask = torch.cat([F.pad(r.completion_mask, (0, Tc - r.completion_mask.shape[1])) for r in rolls])  # (N, Tc)
    lengths, finished = torch.cat([r.completion_lengths for r in rolls]), torch.cat([r.finished for r in rolls])
    logps = None if rolls[0].logps is None else torch.cat([F.pad(r.logps, (0, Tc - r.logps.shape[1])) for r in rolls])
    return Rollout([p for r in rolls for p in r.prompts], rolls[0].group_size, ids, mask, lengths, finished, pad, logps)


def gather_rollout(roll: Rollout, prompts: list[torch.Tensor]) -> Rollout:
    """The batch's Rollout from every rank's share `roll` (the same number of rows on each), in rank order;
    `prompts` are the batch's prompt ids (every rank encodes every row)."""
    if not distributed.active():
        return roll
    Tc, pad = int(distributed.all_max([roll.completion_ids.shape[1]])[0]), roll.pad_token_id
    widen = lambda x, v: F.pad(x, (0, Tc - x.shape[1]), value=v)  # noqa: E731
    ids = distributed.all_gather(widen(roll.completion_ids, pad))  # (N, Tc)
    mask = distributed.all_gather(widen(roll.completion_mask, 0))
    lengths = distributed.all_gather(roll.completion_lengths)
    finished = distributed.all_gather(roll.finished.long()).bool()  # gloo gathers no bool
    logps = None if roll.logps is None else distributed.all_gather(widen(roll.logps, 0.0))
    return Rollout(prompts, roll.group_size, ids, mask, lengths, finished, pad, logps)


def groups(roll: Rollout, index: torch.Tensor) -> Rollout:
    """The groups `index` (long, in order) of `roll`."""
    G, device = roll.group_size, roll.completion_ids.device
    rows = (index.to(device)[:, None] * G + torch.arange(G, device=device)).reshape(-1)  # (len(index) * G,)
    ids, mask = roll.completion_ids[rows], roll.completion_mask[rows]
    prompts = [roll.prompts[i] for i in index.tolist()]
    logps = None if roll.logps is None else roll.logps[rows]
    return Rollout(prompts, G, ids, mask, roll.completion_lengths[rows], roll.finished[rows], roll.pad_token_id, logps)


def informative(total: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N / G,) bool: the group's rewards are not all equal (DAPO keeps a group unless all or none are correct)."""
    grouped = total.view(-1, group_size)
    return grouped.amax(1) != grouped.amin(1)


def collect(next_batch: Callable[[int], Batch], cfg, world_size: int) -> tuple[list[Batch], torch.Tensor, dict]:
    """The batches drawn (`next_batch(i)`: the i-th of the step), which of their groups the step trains (bool over
    the groups of every batch, in data order), and dynamic sampling's metrics (none without it)."""
    batches = [next_batch(0)]
    if not cfg.dynamic_sampling:
        return batches, torch.ones(cfg.prompts_per_step, dtype=torch.bool), {}
    found = informative(batches[0].total, cfg.group_size)
    while int(found.sum()) < cfg.prompts_per_step and len(batches) < cfg.dynamic_sampling_max_batches:
        batches.append(next_batch(len(batches)))
        found = torch.cat([found, informative(batches[-1].total, cfg.group_size)])
    keep = found & (found.cumsum(0) <= cfg.prompts_per_step)
    if int(keep.sum()) < cfg.prompts_per_step:
        usable = int(keep.sum()) - int(keep.sum()) % world_size  # every rank trains as many groups
        keep &= keep.cumsum(0) <= usable
        what = f"training on {usable}" if usable else "no update"
        say(f"dynamic sampling: {int(found.sum())} of {cfg.prompts_per_step} groups with unequal rewards after "
            f"{len(batches)} batches (dynamic_sampling_max_batches): {what}")  # fmt: skip
    stats = {
        "groups_trained": int(keep.sum()),
        "groups_dropped": int((~found).sum()),  # all rewards equal: never reach the loss
        "groups_unused": int(found.sum()) - int(keep.sum()),  # informative, beyond prompts_per_step
        "sampling_batches": len(batches),
        "extra_prompts": (len(batches) - 1) * cfg.prompts_per_step,
    }
    return batches, keep, stats


def kept_share(
    batches: list[Batch], keep: torch.Tensor, rank: int, world_size: int
) -> tuple[Rollout, torch.Tensor, slice]:
    """This rank's contiguous share of the kept groups (a Rollout), the rewards (K * G,) of every kept row in
    data order, and this rank's rows among them."""
    roll, total = concat([b.roll for b in batches]), torch.cat([b.total for b in batches])
    kept = torch.nonzero(keep.to(roll.completion_ids.device)).view(-1)  # (K,) group indices
    per = kept.numel() // world_size
    mine = kept[rank * per : (rank + 1) * per]
    G = roll.group_size
    rewards = total.view(-1, G)[keep.to(total.device)].reshape(-1)  # (K * G,)
    return groups(roll, mine), rewards, slice(rank * per * G, (rank + 1) * per * G)
