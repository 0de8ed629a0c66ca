"""Where a step's micro-batches come from: one source per kind of objective, one interface for the loop.

    source.next_step(state) -> StepBatches: this rank's micro-batches of the next optimizer step

    DatasetBatches       the dataset's examples (SFT family) or preference pairs (DPO family), in the seeded,
                         resumable order of data/collate.BatchSampler, with the reference's log-probs attached
    LengthSampleBatches  the same, and on penalty steps each reply's k samples from the policy (sft_length)
    RolloutBatches       GRPO: each step's prompts completed by the policy (training/rollouts.py), one rollout
                         batch reused for --mu steps; with --dynamic-sampling, more rounds of prompts until the
                         step's groups all have a learning signal; with --sft-data, followed by demonstrations

The data position (epoch, cursor) and the rollout kept for reuse live in the TrainState (training/checkpoint.py),
so a resume continues where the run stopped. Under torchrun every rank builds the same global list of the step's
work and takes its share (distributed.my_share); under --fsdp a rank whose share is short (the last step of an
epoch) is padded with 0-weight micro-batches, here, in `BatchSource.next_step`, so every rank runs as many forward
and backward passes and FSDP's collectives pair up.

Owns: the batch sources, `micro_batches`, the length samples. Imports data, losses, model and training.*.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from data.collate import BatchSampler, collate, pack_rows
from data.datasets import Example
from data.preference import collate_pairs
from losses.grpo import grpo_count
from losses.logprobs import sequence_logprobs
from model.generate import generate, is_truncated
from training import distributed
from training.checkpoint import TrainState
from training.inference import to_device
from training.precision import Precision
from training.rollouts import idle_rollout_batch, make_dynamic_rollout, make_rollout


@dataclass
class StepBatches:
    micro_batches: list[dict]  # this rank's, collated; the last `idle` of them train nothing (padding, torchrun)
    idle: int = 0
    metrics: dict = field(default_factory=dict)  # of making them (rewards, sampling times), logged with the step
    log_entropy: bool = False  # the loop also logs the policy's entropy on the trained tokens (rollouts)


def step_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of the step's items first .. first + count - 1: item k of a step always gets the same seed, so what is
    sampled for it does not depend on the split into micro-batches or ranks."""
    return [int(np.random.SeedSequence([seed, step, k]).generate_state(1)[0]) for k in range(first, first + count)]


def micro_batches(step_ids: list[int], examples: list, batch_size: int, pack_len: int | None) -> list[list]:
    """Split one optimizer step's examples into micro-batches of batch_size examples (or packed rows)."""
    chosen = [examples[i] for i in step_ids]
    if pack_len is None:
        return [chosen[k:k + batch_size] for k in range(0, len(chosen), batch_size)]
    rows = pack_rows([len(e) for e in chosen], pack_len)  # the rows the sampler made; collate rebuilds each
    return [[chosen[i] for row in rows[k:k + batch_size] for i in row] for k in range(0, len(rows), batch_size)]


class BatchSource:
    """The shared part of every source: the sampler's order over `examples` (a step's worth of them per batch),
    advanced in the TrainState, and FSDP's padding."""

    def __init__(self, examples: list, args, tok, device: str, precision: Precision, ranks: distributed.Ranks,
                 pack_len: int | None = None, per_token=sequence_logprobs):
        self.examples, self.args, self.tok, self.device, self.precision, self.ranks = (
            examples, args, tok, device, precision, ranks)
        self.per_token = per_token  # what the loss reads: log-probs of the targets, or a reward model's scores
        step_examples = args.batch_size * args.grad_accum * ranks.world  # a step's examples over all ranks
        self.sampler = BatchSampler(examples, step_examples, seed=args.seed, pack_len=pack_len)
        self._order: tuple[int, list[list[int]]] = (0, self.sampler.epoch_batches(0))

    @property
    def steps_per_epoch(self) -> int:
        return len(self._order[1])

    def next_step_ids(self, state: TrainState) -> list[int]:
        """The next step's example positions (all ranks'), moving the data position in `state` past them."""
        if self._order[0] != state.epoch:
            self._order = (state.epoch, self.sampler.epoch_batches(state.epoch))
        if state.cursor >= len(self._order[1]):
            state.epoch, state.cursor = state.epoch + 1, 0
            self._order = (state.epoch, self.sampler.epoch_batches(state.epoch))
        state.cursor += 1
        return self._order[1][state.cursor - 1]

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each rank runs a step (real ones, then padding up to this number under torchrun)."""
        return self.args.grad_accum

    def next_step(self, state: TrainState) -> StepBatches:
        step = self.make_step(state)
        if self.ranks.active:  # every rank runs as many passes: FSDP's all-gathers need it, DDP keeps ranks in step
            step.idle = self.micro_batches_per_step - len(step.micro_batches)
            step.micro_batches = step.micro_batches + [self.idle_batch()] * step.idle
        return step

    def make_step(self, state: TrainState) -> StepBatches:
        raise NotImplementedError

    def idle_batch(self) -> dict:
        """A micro-batch of this source's kind that the loop trains with weight 0."""
        raise NotImplementedError


class DatasetBatches(BatchSource):
    """Examples or preference pairs (dpo, minor_dpo, reward: a micro-batch of --batch-size pairs puts its
    2 x batch-size sequences through one forward; they are packed inside a micro-batch, never across). `ref_table`
    (precomputed) or `ref_model` (live) give the reference's log-probs; `margins` the reward loss's rows' ratings."""

    def __init__(self, examples: list, args, tok, device: str, precision: Precision, ranks: distributed.Ranks,
                 preference: bool = False, ref_model=None, ref_table: dict | None = None, per_token=sequence_logprobs,
                 margins: dict[int, float] | None = None):
        super().__init__(examples, args, tok, device, precision, ranks,
                         pack_len=args.max_len if args.pack and not preference else None, per_token=per_token)
        self.preference, self.ref_model, self.ref_table, self.margins = preference, ref_model, ref_table, margins
        self.step_micros: list[list] = []  # the step's micro-batches over all ranks (the padding is the first)

    def make_step(self, state: TrainState) -> StepBatches:
        mine = self.my_micros(state)
        return StepBatches([self.collate(micro) for micro in mine])

    def my_micros(self, state: TrainState) -> list[list]:
        """This rank's micro-batches (lists of examples) of the next step."""
        micros = micro_batches(self.next_step_ids(state), self.examples, self.args.batch_size,
                               self.sampler.pack_len)
        self.step_micros = micros
        return distributed.my_share(micros, self.ranks, self.args.grad_accum)  # all of them in one process

    def collate(self, micro: list) -> dict:
        """One micro-batch, with the reference's log-probs when the objective has one."""
        pack_len = self.args.max_len if self.args.pack else None
        if self.preference:
            batch = collate_pairs(micro, self.tok.pad_token_id, pack_len=pack_len, ref_logps=self.ref_table)
            if self.margins is not None:  # --loss reward --margin-scale: the rows' score differences (P,)
                batch["score_margin"] = torch.tensor([self.margins[pair.index] for pair in micro])
        else:
            batch = collate(micro, self.tok.pad_token_id, pack_len=pack_len, ref_logps=self.ref_table)
        if self.ref_model is not None:
            batch = to_device(batch, self.device)
            with torch.no_grad(), self.precision.autocast():
                batch["ref_logps"] = sequence_logprobs(self.ref_model, batch, self.args.chunk_size).float()
        return batch

    def idle_batch(self) -> dict:
        return self.collate(self.step_micros[0])


class LengthSampleBatches(DatasetBatches):
    """sft_length (losses/sft_length.py): on a penalty step (every --length-penalty-every) each micro-batch holds its
    dataset examples followed by --num-generations completions of each example's prompt, sampled by the current
    policy; the loss tells them apart by batch["sample_of"]."""

    def __init__(self, examples: list, args, tok, device: str, precision: Precision, ranks: distributed.Ranks,
                 model, eos: list[int]):
        super().__init__(examples, args, tok, device, precision, ranks)
        self.model, self.eos = model, eos

    def make_step(self, state: TrainState) -> StepBatches:
        if state.step % self.args.length_penalty_every:
            return super().make_step(state)
        mine = self.my_micros(state)
        first = sum(len(m) for m in self.step_micros[:self.ranks.rank * self.args.grad_accum])  # replies before mine
        seeds = step_seeds(self.args.seed, state.step, first, sum(len(m) for m in mine))
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        with distributed.gathered_for_generation(self.model, self.ranks):  # ranks sample different lengths
            batches, metrics = length_sample_batches(self.model, mine, self.tok, self.eos, self.args, generators)
        return StepBatches(batches, metrics=metrics)


def last_reply(example: Example) -> tuple[list[int], int]:
    """(prompt, len(y)) of an example: the ids before its last trained span (for a chat, up to and including the
    last '<|im_start|>assistant\\n'), and that span's length (the last reply and its <|im_end|>)."""
    mask = example.loss_mask
    end = max(t for t, m in enumerate(mask) if m)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return example.input_ids[:max(start, 1)], end + 1 - max(start, 1)


@torch.no_grad()
def length_sample_batches(model, micro: list[list[Example]], tok, eos: list[int], args,
                          generators: list[torch.Generator]) -> tuple[list[dict], dict]:
    """Micro-batches of examples -> the same micro-batches, each followed by k samples of each of its prompts, with
    `sample_of` (N,) and `length_target` (N,). One generate() call for all of them, each reply's k samples drawn with
    its own generator, so the samples do not depend on how the step is split into micro-batches or ranks. Returns
    (micro-batches, metrics of the sampling)."""
    t0 = time.perf_counter()
    k = args.num_generations
    replies = [last_reply(e) for m in micro for e in m]
    completions = generate(model, [p for p, _ in replies], args.max_new_tokens, eos, 1.0, 0, 1.0, tok.pad_token_id,
                           generators, num_samples=k)
    batches, first = [], 0
    for examples in micro:
        samples = [Example(replies[first + i][0] + c, [0] * len(replies[first + i][0]) + [1] * len(c), index=-1)
                   for i in range(len(examples)) for c in completions[(first + i) * k:(first + i + 1) * k]]
        batch = collate(list(examples) + samples, tok.pad_token_id)
        n = len(examples)
        batch["sample_of"] = torch.tensor([-1] * n + [i for i in range(n) for _ in range(k)])  # (N,)
        batch["length_target"] = torch.tensor([0.0] * n + [float(replies[first + i][1]) for i in range(n)
                                                          for _ in range(k)])  # (N,)
        batches.append(batch)
        first += n
    return batches, {"time_generate": time.perf_counter() - t0,
                     "truncated": float(np.mean([is_truncated(c, eos) for c in completions]))}


class RolloutBatches(BatchSource):
    """GRPO: the step's prompts (this rank's share) completed, scored and collated by make_rollout; with --mu > 1
    the rollout batch is kept in the TrainState and trained on for mu steps (old log-probs from before the first).
    With --dynamic-sampling each round of make_dynamic_rollout takes the next step's worth of prompts from the
    sampler (so a step may use several, and an epoch has fewer steps than `steps_per_epoch` says), round r's items
    seeded after round r - 1's: round 0 draws what a step without dynamic sampling draws.

    With `demonstrations` (--sft-data, losses/grpo_sft.py) each step's rollout micro-batches are followed by
    --grad-accum micro-batches of --batch-size demonstrations (this rank's share of the step's, drawn in a seeded
    order that cycles through them; state.demonstrations counts those drawn), each carrying the step's GRPO count C
    and demonstration tokens N over all ranks, computed here before the step's first backward."""

    def __init__(self, prompts: list[Example], args, tok, device: str, precision: Precision,
                 ranks: distributed.Ranks, model, ref_model, rows, rewards, eos: list[int],
                 demonstrations: list[Example] | None = None):
        super().__init__(prompts, args, tok, device, precision, ranks)
        self.model, self.ref_model, self.rows, self.rewards, self.eos = model, ref_model, rows, rewards, eos
        self.demonstrations = demonstrations or []
        self._demonstration_order: tuple[int, list[int]] = (-1, [])

    @property
    def steps_per_epoch(self) -> int:
        return super().steps_per_epoch * self.args.mu  # mu updates per rollout batch

    @property
    def micro_batches_per_step(self) -> int:
        return self.args.grad_accum * (2 if self.demonstrations else 1)  # rollouts, then demonstrations

    def make_step(self, state: TrainState) -> StepBatches:
        metrics: dict = {}
        if state.rollout is None and self.args.dynamic_sampling:
            step_prompts = self.args.batch_size * self.args.grad_accum * self.ranks.world

            def next_round(r: int) -> tuple[list[Example], list[int]]:
                ids = self.next_step_ids(state)
                return ([self.examples[i] for i in ids],
                        step_seeds(self.args.seed, state.step, r * step_prompts, len(ids)))

            state.rollout, metrics = make_dynamic_rollout(
                self.model, self.ref_model, next_round, self.rows, self.tok, self.rewards, self.eos, self.args,
                self.device, self.precision, self.ranks)
        elif state.rollout is None:  # a new rollout batch; else update 2..mu on the kept one
            step_ids = self.next_step_ids(state)
            per_rank = self.args.batch_size * self.args.grad_accum
            seeds = step_seeds(self.args.seed, state.step, 0, len(step_ids))
            state.rollout, metrics = make_rollout(
                self.model, self.ref_model, [self.examples[i] for i in distributed.my_share(step_ids, self.ranks,
                                                                                            per_rank)],
                self.rows, self.tok, self.rewards, self.eos, self.args, self.device, self.precision,
                distributed.my_share(seeds, self.ranks, per_rank), self.ranks)
        batches = state.rollout
        if (state.step + 1) % self.args.mu == 0:  # the batch's last update: the next step draws a new one
            state.rollout = None
        if self.demonstrations:
            batches = batches + self.demonstration_batches(state, batches)
        return StepBatches(batches, metrics=metrics, log_entropy=True)

    def demonstration_order(self, epoch: int) -> list[int]:
        """Pass `epoch` over the demonstrations: a permutation seeded by --seed and the pass."""
        if self._demonstration_order[0] != epoch:
            order = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.demonstrations))
            self._demonstration_order = (epoch, order.tolist())
        return self._demonstration_order[1]

    def demonstration_batches(self, state: TrainState, rollouts: list[dict]) -> list[dict]:
        """This rank's demonstration micro-batches of the step, after its `rollouts`: the step's next
        --batch-size x --grad-accum x world demonstrations (positions state.demonstrations on, passing from one
        seeded order to the next at the end of the data), this rank's share of them, each micro-batch with
        demonstration True, rl_count = C and sft_tokens = N (losses/grpo_sft.py)."""
        per_rank = self.args.batch_size * self.args.grad_accum
        n, first = len(self.demonstrations), state.demonstrations
        positions = range(first, first + per_rank * self.ranks.world)
        ids = [self.demonstration_order(p // n)[p % n] for p in positions]
        state.demonstrations = first + len(ids)
        mine = [self.demonstrations[i] for i in distributed.my_share(ids, self.ranks, per_rank)]
        size = self.args.batch_size
        batches = [collate(mine[k:k + size], self.tok.pad_token_id) for k in range(0, len(mine), size)]
        # C by grpo_loss's own rule, N as sft counts tokens, both over the whole step and every rank; the loop
        # divides by max(its count, 1), so C is taken the same way (losses/grpo_sft.py, departure 3).
        local = [sum(float(grpo_count(b["loss_mask"], b, self.args.loss_agg)) for b in rollouts),
                 sum(float(b["loss_mask"].sum()) for b in batches)]
        rl_count, sft_tokens = distributed.all_sum(local, self.ranks, self.device)
        for batch in batches:
            batch.update(demonstration=True, rl_count=max(rl_count, 1.0), sft_tokens=max(sft_tokens, 1.0))
        return batches

    def idle_batch(self) -> dict:
        return idle_rollout_batch(self.examples[0], self.tok.pad_token_id, self.args, self.device,
                                  self.ref_model is not None)
