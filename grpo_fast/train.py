"""GRPO training in one script: `python -m grpo_fast.train [flags]` (`--help` lists every flag).

With no arguments it trains the embedded tiny Llama (tiny.py) on the built-in "reverse" task, on a CPU
in a few minutes. With `--model` (Hugging Face id or local path) and `--dataset` (HF id, local
JSONL/JSON/CSV/Parquet, or a built-in task) it trains a real model, with LoRA by default.

Each step: draw `prompts_per_step` prompts, sample `group_size` completions per prompt with the
prompt's KV stored once (generate_groups), score them (rewards.py; DAPO's soft overlong punishment is one),
with --dynamic-sampling keep only groups whose rewards differ and draw more (dynamic_sampling.py), compute
group advantages, then `num_iterations` AdamW updates, each accumulating gradients over micro-batches of whole
groups. The loss is fused_linear_grpo_loss on shared-prefix packed hidden states (each prompt computed once per
group, logits never materialized), with every TRL 1.16 loss type and option reduced over the whole step's batch
(accumulation.py); old and reference log-probs come from no-grad fused passes. Recipe presets (config.py): dapo,
gspo, dr_grpo, cispo.
Held-out evaluation (heldout.py): greedy completions of held-out prompts scored by the same rewards, at step 0, every
`eval_steps` steps and after the last, as eval_* fields of metrics.jsonl.
Output directory: metrics.jsonl, reward_curve.png, samples.jsonl, config.json, checkpoints/, final/.
Bad input stops before the model loads (config.validate, dataset_rows, resume.plan) with exit status 2 and one
line; SIGINT/SIGTERM stop at a step boundary with a checkpoint (interrupt.py); --resume is exact (resume.py).

Under `torchrun --nproc_per_node N -m grpo_fast.train` it trains data-parallel (distributed.py): each rank
samples and scores its contiguous share of the step's prompts (whole groups), advantages come from every
rank's rewards, the loss is normalized by global counts, gradients are summed over ranks (ddp) or the
policy is sharded (--parallel fsdp2); metrics are reduced over ranks and rank 0 alone writes files.

Deliberately left out: vLLM rollouts, reward models, sampled (non-greedy) evaluation, tensor/pipeline parallelism.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from . import checkpoint, config, data, dataset_rows, distributed, guard, interrupt, policy, resume, rewards, run_log
from .accumulation import accumulate, logps
from .dynamic_sampling import Batch, collect, concat, gather_rollout, kept_share
from .heldout import HeldOut
from .loss import group_advantages
from .rollout import NonFiniteLogits, Rollout, generate_groups
from .rollout_agreement import agreement_metrics
from .run_log import say
from .schedule import make_optimizer

# ---------------------------------------------------------------------------------------------- setup


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous share of the step's prompts (whole groups)."""
    per = len(items) // world_size
    return items[rank * per : (rank + 1) * per]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------- rollout


def draw(rows, encoded, order: data.PromptOrder, position: int, cfg, device) -> tuple[list[dict], list, int]:
    """The batch of prompts_per_step prompts at data `position`: this rank's rows, every rank's prompt ids [(Lp,)
    int64 on device] (unpadded, encoded up front; this rank's share: `shard`) and the data position of this rank's
    first prompt."""
    rank, world_size = distributed.world()
    picked = order.indices(position, cfg.prompts_per_step)
    ids = [torch.tensor(encoded[i], dtype=torch.long, device=device) for i in picked]
    mine = shard(picked, rank, world_size)
    return [rows[i] for i in mine], ids, position + rank * len(mine)


@torch.no_grad()
def sample(model, prompt_ids: list, cfg, tokenizer, generator, first: int = 0) -> Rollout:
    """G completions per prompt, in calls of `rollout_groups` prompts, each call's generator seeded by (seed, data
    position of its first prompt): the samples of a prompt do not depend on the world size as long as
    rollout_groups divides every rank's share, and ranks draw different streams."""
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    kw |= dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=generator)
    kw |= dict(return_logps=True, compile_decode=config.COMPILE_DECODE[cfg.compile_decode])
    n, rolls = cfg.rollout_groups or len(prompt_ids), []
    model.eval()
    try:
        for i in range(0, len(prompt_ids), n):
            generator.manual_seed((cfg.seed * 2**32 + first + i) % 2**63)
            rolls.append(distributed.forward(model, generate_groups, prompt_ids[i : i + n], cfg.group_size, **kw))
    finally:
        model.train()
    return concat(rolls)


def score(cfg, tokenizer, batch: list[dict], roll, funcs, weights) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Every rank's rows' table (F + 2, N) (reward functions' scores, completion lengths, cut flags) and weighted
    rewards (N,), in rank order; this rank's prompt texts, completions (decoded) and rewards."""
    G = cfg.group_size
    lengths = roll.completion_mask.sum(1).tolist()  # (B*G,)
    ids = [roll.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    completions = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    rep = [r for r in batch for _ in range(G)]  # dataset rows repeated per sample
    prompts = [r[cfg.prompt_column] for r in rep]
    columns = rewards.columns(rep, cfg.prompt_column, cfg.answer_column)
    local = rewards.table(funcs, prompts, completions, ids, columns)  # (F, B*G), NaN = no score
    per_row = torch.tensor([lengths, (~roll.finished).tolist()], dtype=torch.float32)  # (2, B*G)
    every = distributed.all_gather(torch.cat([local, per_row]), dim=1)  # (F + 2, N): all ranks' rows
    total = rewards.combine(list(funcs), weights, every[:-2])[0]
    rank = distributed.world()[0]
    return every, total, (prompts, completions, total[rank * len(ids) : (rank + 1) * len(ids)].tolist())


def reward_stats(table: torch.Tensor, funcs, weights, group_size: int) -> dict:
    """Reward and length statistics over every sampled row of the step: table (F + 2, N) as `score` gives it."""
    total, stats = rewards.combine(list(funcs), weights, table[:-2])
    length, cut = table[-2], table[-1]
    return stats | {
        "reward": float(total.mean()),
        "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        "frac_reward_zero_std": float((total.view(-1, group_size).std(1) < 1e-6).float().mean()),
        "completion_length_mean": float(length.mean()),
        "completion_length_max": int(length.max()),
        "clipped_ratio": float(cut.mean()),  # cut at max_new_tokens
    }


def mask_truncated(roll: Rollout, tokenizer) -> Rollout:
    """TRL 1.16's mask_truncated_completions: the completion mask zeroed on every row TRL calls truncated, whose
    last token is neither EOS nor the pad token (a row cut at max_new_tokens on a sampled pad id passes as finished,
    as in TRL). The rows keep their rewards (group statistics) and still count as rows where the loss type does."""
    last = roll.completion_ids.gather(1, (roll.completion_lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    ends = torch.tensor([tokenizer.eos_token_id, tokenizer.pad_token_id], device=last.device)
    cut = (roll.completion_lengths > 0) & ~torch.isin(last, ends)
    return dataclasses.replace(roll, completion_mask=roll.completion_mask * ~cut.unsqueeze(1))


# --------------------------------------------------------------------------------------------- update


def micro_batches(roll, advantages: torch.Tensor, cfg) -> list[dict]:
    """Whole groups per micro-batch, each trimmed to its longest completion."""
    G, out = cfg.group_size, []
    n_groups = roll.completion_ids.shape[0] // G
    for g0 in range(0, n_groups, cfg.micro_batch_groups):
        g1 = min(n_groups, g0 + cfg.micro_batch_groups)
        mask = roll.completion_mask[g0 * G : g1 * G]  # (b*G, Tc)
        T = max(1, int(mask.sum(1).max()))
        out.append(
            dict(
                prompts=roll.prompts[g0:g1],
                ids=roll.completion_ids[g0 * G : g1 * G, :T],
                mask=mask[:, :T],
                advantages=advantages[g0 * G : g1 * G],
                sampling=None if roll.logps is None else roll.logps[g0 * G : g1 * G, :T],  # the rollout's log-probs
            )
        )
    return out


def add_reference_logps(model, ref, mbs: list[dict], cfg) -> None:
    """Old log-probs (only when a rollout feeds several updates and old_logps_from=training; then also the entropies
    top_entropy_quantile ranks in the first update) and reference log-probs (beta != 0)."""
    quantile = cfg.top_entropy_quantile < 1.0
    for mb in mbs:
        mb["old"], mb["entropy"] = None, None
        if cfg.num_iterations > 1 and cfg.old_logps_from == "training":
            mb["old"], mb["entropy"] = logps(model, mb, cfg, True) if quantile else (logps(model, mb, cfg), None)
        mb["ref"] = None
        if ref is not None:
            with policy.reference_context(model, ref):
                mb["ref"] = logps(ref, mb, cfg)


class Diverged(ValueError):
    """The policy's weights are no longer finite."""


def update(model, optimizer, scheduler, mbs: list[dict], cfg) -> dict:
    """One optimizer update; a non-finite loss or gradient is reported and not applied, non-finite weights after
    it raise Diverged."""
    if not mbs:  # dynamic sampling found no group to train, on every rank: no update, the schedule moves on
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        return {"loss": math.nan, "grad_norm": math.nan, "lr": lr, "skipped": 1}
    params = [p for group in optimizer.param_groups for p in group["params"]]  # fsdp2: the sharded ones
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = accumulate(model, mbs, cfg)
    sharded = isinstance(model, distributed.Runner)  # fsdp2 has reduce-scattered in backward
    if not sharded:
        distributed.all_reduce_grads(params)
    grad_norm = distributed.clip_grad_norm(params, cfg.max_grad_norm, sharded)
    applied = math.isfinite(float(loss)) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
        if not distributed.all_finite(params):  # a finite gradient can still overflow the weights (huge LR, bf16)
            raise Diverged("non-finite weights after the update")
    else:
        say(f"non-finite loss ({float(loss)}) or grad norm ({grad_norm}): update not applied")
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return {"loss": float(loss), **metrics, "grad_norm": grad_norm, "lr": lr, "skipped": int(not applied)}


# ----------------------------------------------------------------------------------------------- loop


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KB on Linux)


def train_step(step, cfg, model, ref, optimizer, scheduler, source, position, funcs, weights, tokenizer, gen):
    """Rollouts and scoring of a batch at data `position` (several with dynamic sampling), num_iterations updates;
    returns (metrics row, this rank's prompts, completions and rewards, prompts drawn). source: rows, encoded, order."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # peak_mem_mb is this step's
    (rank, world_size), device = distributed.world(), distributed.device()

    def next_batch(i: int) -> Batch:  # the step's i-th batch, every rank's rows
        batch, ids, first = draw(*source, position + i * cfg.prompts_per_step, cfg, device)
        roll = sample(model, shard(ids, rank, world_size), cfg, tokenizer, gen, first)
        scored = score(cfg, tokenizer, batch, roll, funcs, weights)
        return Batch(gather_rollout(roll, ids), *scored)

    t0 = time.perf_counter()
    batches, keep, sampling = collect(next_batch, cfg, world_size)
    rollout_s = time.perf_counter() - t0
    table = torch.cat([b.table for b in batches], dim=1)  # (F + 2, every sampled row)
    stats = reward_stats(table, funcs, weights, cfg.group_size) | sampling
    for name in (n for n in funcs if math.isnan(stats[f"reward_{n}_mean"])):
        say(f"warning: step {step + 1}: reward {name!r} scored no sample (it returned None for every one)")
    t1 = time.perf_counter()
    roll, r, mine = kept_share(batches, keep, rank, world_size)  # r: (K*G,) every kept row's reward
    roll = mask_truncated(roll, tokenizer) if cfg.mask_truncated_completions else roll
    adv = group_advantages(r.to(device), cfg.group_size, cfg.scale_rewards)[mine] if r.numel() else r  # (B*G,)
    mbs = micro_batches(roll, adv, cfg)
    add_reference_logps(model, ref, mbs, cfg)
    updates = [update(model, optimizer, scheduler, mbs, cfg) for _ in range(cfg.num_iterations)]
    update_s = time.perf_counter() - t1
    tokens = float(table[-2].sum())  # every sampled token, all ranks; rank 0's clock
    row = {"step": step + 1, **stats, **{k: float(np.mean([u[k] for u in updates])) for k in updates[0]}}
    row |= agreement_metrics(mbs)  # rollout vs training log-probs of the first update
    row |= {"tokens_per_s": tokens / (rollout_s + update_s), "rollout_s": rollout_s, "update_s": update_s}
    row["peak_mem_mb"] = distributed.all_max([peak_mem_mb(device)])[0]
    texts = [[x for b in batches for x in b.texts[j]] for j in range(3)]
    return row, *texts, len(batches) * cfg.prompts_per_step


def save_final(model, tokenizer, out: Path) -> None:
    """final/: the policy in transformers (or peft adapter) format, written by rank 0."""
    state = distributed.full_state_dict(model) if isinstance(model, distributed.Runner) else None  # collective
    if distributed.is_main():
        with run_log.writing(out / "final"):
            distributed.unwrap(model).save_pretrained(out / "final", **({"state_dict": state} if state else {}))
            tokenizer.save_pretrained(out / "final")
    distributed.barrier()


def save(cfg, ckpt_dir: Path, done: int, model, optimizer, scheduler, gen, position: int) -> None:
    """checkpoint-<done>; trainer_state.json also holds the run's config (checked on --resume)."""
    state, sharded = {"data_position": position, "config": config.to_dict(cfg)}, isinstance(model, distributed.Runner)
    checkpoint.save(ckpt_dir, done, model, optimizer, scheduler, gen, state, cfg.keep_checkpoints, sharded)


def setup(cfg: config.Config, out: Path):
    """Everything that can fail without a model, in order of cost: the output directory, the tokenizer, every
    dataset row (checked and encoded), the reward functions (dry run), the held-out rows, the checkpoint to resume
    from."""
    if distributed.is_main():
        run_log.prepare(out)
    tokenizer = policy.load_tokenizer(cfg.model)
    rows = data.load(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.prompt_column, cfg.answer_column, cfg)
    encoded = dataset_rows.encode(rows, cfg, tokenizer)
    dataset_rows.check_answers(rows, cfg)
    funcs, weights = rewards.configured(cfg)
    dataset_rows.dry_run(funcs, weights, rows, cfg)
    held = HeldOut.load(cfg, tokenizer, funcs, weights)
    return tokenizer, rows, encoded, funcs, weights, held, resume.plan(cfg, out)


@interrupt.catching
def run(cfg: config.Config) -> list[dict]:
    """Trains according to `cfg`; returns the metrics rows written by this call. Bad input is a ValueError (before
    step 1 wherever possible); a signal ends the run with interrupt.Stopped after a checkpoint of the last step."""
    cfg = config.validate(cfg)
    out, world_size = Path(cfg.output_dir), distributed.world()[1]
    if cfg.prompts_per_step % world_size:
        raise ValueError(
            f"prompts_per_step={cfg.prompts_per_step} must be divisible by the world size {world_size}: each rank "
            "trains whole groups of its own prompts (groups never straddle ranks)"
        )
    device = distributed.device()
    distributed.init(device)  # torchrun: nccl on CUDA, gloo on CPU; a missing backend fails here
    seed_all(cfg.seed)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    tokenizer, rows, encoded, funcs, weights, held, candidates = setup(cfg, out)
    model, ref = policy.load_policy(cfg, tokenizer, device)
    transformers.utils.logging.disable_progress_bar()  # checkpoint writes would break the run's own bar
    policy.check_positions(model, cfg.max_prompt_length, cfg.max_new_tokens)
    guard.check_model(model)  # the engine must reproduce the model's own forward (training and rollouts)
    model, ref = distributed.parallelize(model, ref, cfg.parallel)
    optimizer, scheduler = make_optimizer(cfg, model)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    source = (rows, encoded, data.PromptOrder(len(rows), cfg.seed))
    ckpt_dir, metrics_path = out / "checkpoints", out / "metrics.jsonl"
    step, position = resume.start(cfg, out, candidates, model, optimizer, scheduler, gen)
    main, saved = distributed.is_main(), step  # saved: the last step with a checkpoint (0: none)
    if main:
        run_log.write_text(out / "config.json", json.dumps(config.to_dict(cfg), indent=2))
    written, show = [], cfg.progress and main
    if step == 0 and held.due(0):  # the policy before training: its own row
        written.append({"step": 0, **held.after(model, 0)})
        if main:
            run_log.append_jsonl(metrics_path, written[-1])
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, disable=not show, desc="grpo")
    signals = interrupt.signals()
    for step in bar:
        if signals.stop():  # at a step boundary: checkpoint the last completed step, then stop
            if step > saved:
                save(cfg, ckpt_dir, step, model, optimizer, scheduler, gen, position)
            where = checkpoint.latest(ckpt_dir)
            raise signals.stopped(f"stopped after step {step}; checkpoint: {where or 'none (no step completed)'}")
        try:
            row, prompts, completions, r, drawn = train_step(
                step, cfg, model, ref, optimizer, scheduler, source, position, funcs, weights, tokenizer, gen
            )  # fmt: skip
        except (Diverged, NonFiniteLogits) as e:  # nothing of this step is written
            last = checkpoint.latest(ckpt_dir) or "none"
            raise ValueError(f"training diverged at step {step + 1}: {e}; last checkpoint (finite): {last}") from None
        position += drawn
        row |= held.after(model, step + 1)  # before the step's checkpoint: a resumed run never misses it
        written.append(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        done = step + 1
        if main:  # rank 0 writes the logs (rows are reduced over ranks; samples are rank 0's)
            run_log.append_jsonl(metrics_path, row)
            if cfg.log_samples_steps and (done % cfg.log_samples_steps == 0 or done == 1):
                run_log.append_jsonl(out / "samples.jsonl", run_log.samples(done, prompts, completions, r))
        if (cfg.save_steps and done % cfg.save_steps == 0) or done == cfg.max_steps:
            save(cfg, ckpt_dir, done, model, optimizer, scheduler, gen, position)
            saved = done
        if main and ((cfg.plot_steps and done % cfg.plot_steps == 0) or done == cfg.max_steps):
            run_log.try_plot(metrics_path, out / "reward_curve.png")  # after the checkpoint: never in its way
    save_final(model, tokenizer, out)
    if main:
        held.summary(metrics_path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when training completed; 2 and one line `error: ...` for bad input; 130/143 after a signal."""
    argv = sys.argv[1:] if argv is None else list(argv)
    rank, world_size = distributed.world()
    try:
        run(config.parse(argv))
    except SystemExit as e:  # argparse: --help (0), or a usage error it has printed (2)
        return e.code if isinstance(e.code, int) else 2
    except interrupt.Stopped as e:
        if rank == 0:
            print(f"{e.message}\nresume with: {interrupt.resume_command(argv)}", file=sys.stderr)
        return e.code
    except ValueError as e:  # bad input (including reward errors): one clear line, no traceback
        print(f"error{f' (rank {rank})' if world_size > 1 else ''}: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
