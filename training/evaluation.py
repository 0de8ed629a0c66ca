"""Held-out evaluation during training, and the before/after report a run ends with.

    evaluate           mean NLL (and perplexity) of the held-out examples' trained tokens
    evaluate_pairs     paper 000's preference accuracy (Eq. 4) and the chosen replies' NLL
    evaluate_rollouts  greedy reward and accuracy, and avg@k of sampled completions (grpo)
    make_evaluator     the one a run uses, as `evaluate(model) -> dict`; `eval_loss` ranks its results (--patience)
    measure, report    what changed: held-out figures and greedy accuracy before and after training

Owns: the evals above. Imports data, losses, model and training.inference / training.distributed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data.answers import DEFAULT_TIMEOUT_S, share_correct
from data.collate import collate
from data.datasets import load_rows, prompt_and_answer, reference_answer
from data.preference import collate_pairs
from losses.common import last_token_mask, per_sequence_sum
from losses.logprobs import sequence_scores
from data.rewards import Completion
from data.rewards import score as score_rewards
from data.tokenizer import load_tokenizer
from losses import ON_SCORES, ONLINE
from model import UserError, load_model, load_reward_model
from model.generate import generate, is_truncated, stop_ids
from training import distributed
from training.checkpoint import read_metrics
from training.inference import batched_logprobs
from training.precision import Precision

EVAL_SAMPLING_SEED = 1234  # held-out sampling: the same random stream at every evaluation
REPORT_MAX_NEW_TOKENS = 256
ONLINE_REPORT = ("eval_reward", "eval_accuracy", "eval_accuracy_sampled")  # what an online run reports


def evaluate(model, examples: list, pad_id: int, batch_size: int, precision: Precision, chunk_size: int) -> dict:
    """Mean NLL over the response tokens of held-out examples, and its perplexity."""
    model.eval()
    nll, tokens = 0.0, 0.0
    for _, batch, logps in batched_logprobs(model, examples, lambda chunk: collate(chunk, pad_id), batch_size,
                                            chunk_size, precision.autocast):
        nll -= float(logps.sum())
        tokens += float(batch["loss_mask"].sum())
    model.train()
    mean = nll / max(tokens, 1.0)
    return {"eval_nll": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


def evaluate_pairs(model, pairs: list, pad_id: int, batch_size: int, precision: Precision, chunk_size: int) -> dict:
    """Held-out pairs: paper 000's preference accuracy (Eq. 4: log pi(y_w|x) > log pi(y_l|x), needs no reference),
    and the per-token NLL of the chosen responses as eval_nll."""
    model.eval()
    correct, nll, tokens = 0.0, 0.0, 0.0
    for _, batch, logps in batched_logprobs(model, pairs, lambda chunk: collate_pairs(chunk, pad_id), batch_size,
                                            chunk_size, precision.autocast):
        seq = logps.sum(1)  # (2P,) one sequence per row: no packing here
        chosen, rejected = seq[batch["chosen_seq"]], seq[batch["rejected_seq"]]  # (P,), (P,)
        correct += float((chosen > rejected).sum())
        nll -= float(chosen.sum())
        tokens += float(batch["loss_mask"][batch["chosen_seq"]].sum())
    model.train()
    mean = nll / max(tokens, 1.0)
    return {"eval_nll": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": tokens,
            "eval_preference_accuracy": correct / max(len(pairs), 1)}


def evaluate_reward_pairs(model, pairs: list, pad_id: int, batch_size: int, precision: Precision,
                          chunk_size: int) -> dict:
    """A reward model on held-out pairs: pairwise accuracy (r(x, y_w) > r(x, y_l)), the mean margin and the mean
    Bradley-Terry loss -log sigmoid(r_w - r_l) (losses/reward.py without margin or centering)."""
    model.eval()
    correct, margin, loss = 0.0, 0.0, 0.0
    for _, batch, scores in batched_logprobs(model, pairs, lambda chunk: collate_pairs(chunk, pad_id), batch_size,
                                             chunk_size, precision.autocast, per_token=sequence_scores):
        r = per_sequence_sum(scores * last_token_mask(batch), batch)  # (2P,)
        diff = r[batch["chosen_seq"]] - r[batch["rejected_seq"]]  # (P,)
        correct += float((diff > 0).sum())
        margin += float(diff.sum())
        loss -= float(torch.nn.functional.logsigmoid(diff).sum())
    model.train()
    n = max(len(pairs), 1)
    return {"eval_reward_accuracy": correct / n, "eval_margin": margin / n, "eval_loss": loss / n}


@torch.no_grad()
def evaluate_rollouts(model, examples: list, rows, tok, rewards, eos: list[int], args) -> dict:
    """Held-out prompts: one greedy completion each (mean total reward, and accuracy when every row has a reference
    answer, checked by data/answers.py as the accuracy reward is), plus --eval-samples completions each sampled at
    --temperature: their mean accuracy is avg@k, what the rollouts' expected reward measures. The sampling generator
    has a fixed seed, so evaluations before and after training draw from the same random stream."""
    model.eval()
    answers = [reference_answer(rows[e.index]) for e in examples]

    def complete(temperature: float, k: int) -> list[Completion]:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(EVAL_SAMPLING_SEED)
        texts = []
        for s in range(0, len(examples), 64):
            outs = generate(model, [e.input_ids for e in examples[s:s + 64]], args.max_new_tokens, eos, temperature,
                            args.top_k, args.top_p, tok.pad_token_id, generator, num_samples=k)
            texts += [Completion(tok.decode(o, skip_special_tokens=True), len(o), is_truncated(o, eos)) for o in outs]
        return texts

    texts = complete(0.0, 1)
    totals, _ = score_rewards(rewards, texts, [rows[e.index] for e in examples])
    scored = [r for r in totals if r is not None]
    out = {"eval_reward": float(np.mean(scored)) if scored else math.nan,
           "eval_completion_len": float(np.mean([c.num_tokens for c in texts])), "eval_prompts": len(examples)}
    if all(a is not None for a in answers):
        out["eval_accuracy"] = share_correct(texts, answers, args.answer_timeout)
        if args.eval_samples:
            k = args.eval_samples
            out["eval_accuracy_sampled"] = share_correct(complete(args.temperature, k),
                                                         [a for a in answers for _ in range(k)], args.answer_timeout)
    model.train()
    return out


@dataclass
class Evaluator:
    """A run's held-out eval, `evaluator(model) -> dict` of eval_* figures."""

    run: Callable[[torch.nn.Module], dict]
    logs_start: bool = False  # the starting model's eval is logged as step 0 (grpo: its reward curve starts there)

    def __call__(self, model: torch.nn.Module) -> dict:
        return self.run(model)


def make_evaluator(args, examples: list, rows, tok, rewards, eos: list[int], precision: Precision,
                   ranks: distributed.Ranks, kind: str) -> Evaluator:
    """The run's held-out eval: `kind` is 'rollouts' (grpo), 'pairs' (dpo family), 'reward' (a reward model on
    pairs) or 'examples'."""
    if kind == "rollouts":
        def sampled(model) -> dict:  # every rank samples the same held-out completions
            with distributed.gathered_for_generation(model, ranks):
                return evaluate_rollouts(model, examples, rows, tok, rewards, eos, args)
        return Evaluator(sampled, logs_start=True)
    fn = {"pairs": evaluate_pairs, "reward": evaluate_reward_pairs}.get(kind, evaluate)
    return Evaluator(lambda model: fn(model, examples, tok.pad_token_id, args.batch_size, precision, args.chunk_size))


def eval_loss(ev: dict) -> float:
    """Lower is better, for --patience: the held-out preference (or reward-model) error, else the NLL, else minus
    the accuracy."""
    if "eval_reward_accuracy" in ev:
        return 1.0 - ev["eval_reward_accuracy"]
    if "eval_preference_accuracy" in ev:
        return 1.0 - ev["eval_preference_accuracy"]
    if "eval_nll" in ev:
        return ev["eval_nll"]
    return -ev.get("eval_accuracy_sampled", ev.get("eval_accuracy", ev["eval_reward"]))


def eval_line(ev: dict) -> str:
    """'nll 1.2345 (ppl 3.44), preference accuracy 0.700' for the progress output."""
    shown = (f"nll {ev['eval_nll']:.4f} (ppl {ev['eval_ppl']:.2f})" if "eval_nll" in ev else
             ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in ev.items()))
    if "eval_preference_accuracy" in ev:
        shown += f", preference accuracy {ev['eval_preference_accuracy']:.3f}"
    return shown


# ----------------------------------------------------------------------------------------------------------------
# What changed: the before/after lines a run ends with (held-out NLL, and greedy accuracy when the eval rows carry
# answers), so a short run says in terms a user cares about whether the objective helped.

def report_problems(args) -> list[tuple[list[dict], str]]:
    """The first --report-problems rows of --eval-data as (prompt turns, reference answer); none without answers."""
    if not args.report_problems or not args.eval_data:
        return []
    rows = load_rows(args.eval_data, args.eval_split)[:args.report_problems]
    try:
        return [prompt_and_answer(row, f"{args.eval_data} row {i + 1}") for i, row in enumerate(rows)]
    except UserError:
        return []  # e.g. plain text rows: the report then has the NLL only


@torch.no_grad()
def greedy_accuracy(model, tok, model_dir: Path, problems: list[tuple[list[dict], str]],
                    ranks: distributed.Ranks = distributed.SINGLE) -> float:
    """Share of `problems` the model solves with greedy decoding (answers checked by data/answers.py)."""
    model.eval()
    eos = stop_ids(model_dir, model, tok.im_end_id)
    with distributed.gathered_for_generation(model, ranks):  # every rank decodes the same problems
        outs = generate(model, [tok.encode_prompt(messages) for messages, _ in problems], REPORT_MAX_NEW_TOKENS,
                        eos, temperature=0.0, pad_id=tok.pad_token_id)
    model.train()
    return share_correct([tok.decode(o, skip_special_tokens=True) for o in outs], [a for _, a in problems],
                         DEFAULT_TIMEOUT_S)


REPORT_KEYS = ("eval_nll", "eval_preference_accuracy", "eval_reward_accuracy", *ONLINE_REPORT)  # the held-out figures a report shows


def measure_start(model, tok, model_dir: Path, evaluator: Evaluator | None, problems: list, log, path: Path,
                  fresh: bool, ranks: distributed.Ranks) -> dict:
    """The report's "before": on a fresh start measured and written to `path` (kept across a resume: "before" is the
    run's starting model), then read back by every rank. Held-out NLL (and preference accuracy for pairs) or the
    rollout eval, plus greedy accuracy on the report problems."""
    if fresh:
        figures = {}
        if evaluator is not None:
            ev = evaluator(model)
            if evaluator.logs_start:
                log.write({"step": 0, "eval": True, **ev})
            figures = {k: ev[k] for k in REPORT_KEYS if k in ev}
        if problems:
            figures["greedy_accuracy"] = greedy_accuracy(model, tok, model_dir, problems, ranks)
        if ranks.main:
            path.write_text(json.dumps(figures) + "\n")
    distributed.barrier(ranks)  # every rank reads the file rank 0 wrote
    return json.loads(path.read_text()) if path.is_file() else {}


def measure_end(model, tok, model_dir: Path, summary: dict, problems: list, ranks: distributed.Ranks) -> dict:
    """The report's "after": the final held-out figures of `summary`, plus greedy accuracy on the report problems."""
    after = {k: summary[k] for k in REPORT_KEYS if k in summary}
    if problems:
        after["greedy_accuracy"] = greedy_accuracy(model, tok, model_dir, problems, ranks)
    return after


def write_report(before: dict, after: dict, args, path: Path, problems: list, ranks: distributed.Ranks) -> None:
    """OUT/summary.json and the 'what changed' lines."""
    report = {"data": args.eval_data, "report_problems": len(problems), "before": before, "after": after}
    if ranks.main:
        path.write_text(json.dumps(report, indent=2) + "\n")
    names = {"eval_nll": "held-out NLL", "eval_preference_accuracy": "preference accuracy",
             "eval_reward_accuracy": "reward-model pair accuracy",
             "greedy_accuracy": f"accuracy (greedy, {args.report_problems} problems)",
             "eval_reward": "reward (greedy)", "eval_accuracy": "accuracy (greedy)",
             "eval_accuracy_sampled": f"accuracy (avg@{args.eval_samples}, temperature {args.temperature:g})"}
    keys = [k for k in names if k in after]
    if not keys:
        return
    print(f"what changed on {args.eval_data}:" + "".join(
        f"\n  {names[k]:34s} {before.get(k, float('nan')):8.3f} -> {after[k]:8.3f}" for k in keys))
    print(f"(before -> after; written to {path})")


def finish_report(args, out: Path, device: str, ranks: distributed.Ranks) -> dict:
    """A run killed after writing final/ but before summary.json: the report from final/ (its last eval row is in
    metrics.jsonl; greedy accuracy is measured again on the final weights)."""
    model, model_dir = (load_reward_model if args.loss in ON_SCORES else load_model)(out / "final", torch.float32,
                                                                                      device)
    tok = load_tokenizer(model_dir)
    rows = read_metrics(out / "metrics.jsonl")
    summary = {k: v for r in rows if r.get("eval") for k, v in r.items()}  # the last eval's figures
    steps = [r["step"] for r in rows if not r.get("eval")]
    summary.update(steps=steps[-1] if steps else 0, stop_reason="finished its report after a kill")
    problems = [] if args.loss in ONLINE | ON_SCORES else report_problems(args)
    before_file = out / "summary_before.json"
    before = json.loads(before_file.read_text()) if before_file.is_file() else {}
    after = measure_end(model, tok, model_dir, summary, problems, ranks)
    write_report(before, after, args, out / "summary.json", problems, ranks)
    summary.update(before=before, after=after, message=f"{out} had finished training; its report is now written to "
                   f"{out / 'summary.json'}.")
    return summary
