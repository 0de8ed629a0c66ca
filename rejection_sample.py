"""Rejection sampling: k completions per problem from a model, checked against the reference answers, written as
training data (the offline RL setting of the DFT paper, Sec. 4.2: rejection-sampling fine-tuning data for SFT/DFT,
and correct-versus-incorrect pairs for DPO).

    python rejection_sample.py --model runs/sft/final --data lab:train:prompt --k 8 --out runs/rft
    python train.py --loss dft --model runs/sft/final --data runs/rft/sft.jsonl
    python train.py --loss dpo --model runs/sft/final --data runs/rft/pairs.jsonl

Writes to --out:
  sft.jsonl     one row per correct completion (at most --max-per-problem per problem, distinct texts):
                {"messages": prompt turns + the completion as the assistant turn, "answer": ...}
  pairs.jsonl   for each problem with both a correct and an incorrect completion, up to --max-pairs-per-problem
                rows {"prompt": turns, "chosen": turns + correct, "rejected": turns + incorrect, "answer": ...}
                (the lab's preference layout, UltraFeedback's)
  stats.json    counts: problems, completions, correct, problems with a correct / with a pair, rows written.
Checking is data/answers.py's, the same as eval.py's accuracy and the GRPO accuracy reward.

Best-of-n with a reward (`--reward`, train.py's syntax, repeatable: `model:DIR[:W]` for a reward model, rule
rewards, FILE.py:FN):
    python rejection_sample.py --model runs/sft/final --k 16 --max-per-problem 2 --reward model:runs/rm/final --out runs/bon
every sample is scored (the weighted total of the rewards, as GRPO adds them; a reward model scores each completion
with its prompt, batched, through its own tokenizer and chat template, on --device) and answer checking still
decides what is correct: sft.jsonl keeps the --max-per-problem highest-scoring correct completions (best first) and
pairs.jsonl pairs the best correct with the worst incorrect, the second best with the second worst, and so on. Rows
then carry their scores (`reward`; `score_chosen` / `score_rejected`, which train.py --loss reward --margin-scale
reads). A sample whose reward is None ranks last. Without --reward the output is as above, in sample order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cli import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, TOP_P, Parser, device_name, model_spec, output_dir
from data.answers import DEFAULT_TIMEOUT_S, grade_all
from data.datasets import load_rows, prompt_and_answer, row_location
from data.rewards import Completion, build_rewards
from data.rewards import score as score_rewards
from data.tokenizer import load_tokenizer
from model import UserError, default_device, load_model
from model.generate import generate, is_truncated, stop_ids
from training.reward_scoring import model_reward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(description=__doc__)
    ap.add_argument("--model", required=True, help="checkpoint directory, hub id or 'lab' that samples the completions")
    ap.add_argument("--data", default="lab:train:prompt", help="rows with a reference answer (default lab:train:prompt)")
    ap.add_argument("--split", default="train", help="split of a hub or directory dataset")
    ap.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N problems (>= 1)")
    ap.add_argument("--k", type=POSITIVE_INT, default=8, help="completions per problem (>= 1; default 8)")
    ap.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0, help="sampling temperature (> 0; default 1.0)")
    ap.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus mass (0 < p <= 1; default 1: off)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, help="longest completion (>= 1; default 256)")
    ap.add_argument("--max-per-problem", type=POSITIVE_INT, default=4,
                    help="correct completions kept per problem for sft.jsonl (>= 1; default 4)")
    ap.add_argument("--max-pairs-per-problem", type=NON_NEGATIVE_INT, default=1, help="pairs per problem (>= 0; default 1)")
    ap.add_argument("--reward", action="append", default=None, metavar="model:DIR[:W] | NAME[:W] | FILE.py:FN[:W]",
                    help="best-of-n: rank each problem's samples by this reward (repeatable; weights add as in GRPO), "
                         "e.g. model:DIR for a reward model; correct samples still come from the answer check")
    ap.add_argument("--keep-truncated", action="store_true",
                    help="also keep correct completions that hit --max-new-tokens (default: dropped)")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="sequences per generation batch (>= 1; default 64)")
    ap.add_argument("--answer-timeout", type=POSITIVE_FLOAT, default=DEFAULT_TIMEOUT_S, help="seconds per answer check (> 0)")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of the sampling")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--device", type=device_name, default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--out", type=output_dir, required=True, help="output directory")
    return ap.parse_args(argv)


def split_samples(samples: list[dict], max_per_problem: int, max_pairs: int, keep_truncated: bool,
                  ranked: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """(correct completions to keep, (correct, incorrect) pairs) of one problem's graded samples, in sample order,
    distinct texts only. A truncated completion is never a chosen one unless keep_truncated, nor a rejected one (a
    cut-off text is not a wrong answer); a check that timed out is neither correct nor incorrect; an empty completion
    (the stop token at once) is neither, since a training row's reply must have text. `ranked` (the
    samples have a "reward"): correct ones highest reward first, incorrect ones lowest first, None last in both,
    ties in sample order; so the kept ones are the best n, and each pair is the best left against the worst left."""
    correct, wrong = [], []
    if ranked:
        correct_first = sorted(samples, key=lambda s: (s["reward"] is None, -(s["reward"] or 0.0)))
        wrong_first = sorted(samples, key=lambda s: (s["reward"] is None, s["reward"] or 0.0))
        samples = [s for s in correct_first if s["correct"] is True] + [s for s in wrong_first if s["correct"] is False]
    for s in samples:
        if (s["truncated"] and not (keep_truncated and s["correct"] is True)) or not s["text"].strip():
            continue
        bucket = correct if s["correct"] is True else wrong if s["correct"] is False else None
        if bucket is not None and s["text"] not in bucket:
            bucket.append(s["text"])
    return correct[:max_per_problem], list(zip(correct, wrong))[:max_pairs]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace) -> dict:
    device = args.device or default_device()
    rewards = None
    if args.reward:  # first: a bad spec or a path that is not a reward model is said before any other work
        rewards = build_rewards(args.reward, {"answer_timeout": args.answer_timeout},
                                model_reward=lambda path, spec: model_reward(path, spec, device))
    rows = load_rows(args.data, args.split)
    if args.limit:
        rows = rows[:args.limit]
    problems = [prompt_and_answer(row, row_location(rows, i, source=None)) for i, row in enumerate(rows)]
    model, model_dir = load_model(model_spec(args.model), args.dtype, device)
    tok = load_tokenizer(model_dir)
    eos = stop_ids(model_dir, model, tok.im_end_id)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"problems": len(problems), "completions": 0, "correct": 0, "truncated": 0, "timed_out": 0,
             "problems_with_correct": 0, "problems_with_pair": 0, "sft_rows": 0, "pair_rows": 0}
    scored: dict[str, list[float]] = {"all": [], "sft": []}  # with --reward: the rewards of all samples, of kept ones
    start = time.perf_counter()
    per_batch = max(1, args.batch_size // args.k)
    with open(out / "sft.jsonl", "w") as sft_file, open(out / "pairs.jsonl", "w") as pair_file:
        for s in range(0, len(problems), per_batch):
            chunk = problems[s:s + per_batch]
            outs = generate(model, [tok.encode_prompt(m) for m, _ in chunk], args.max_new_tokens, eos,
                            args.temperature, 0, args.top_p, tok.pad_token_id, generator, num_samples=args.k)
            decoded = [tok.decode(o, skip_special_tokens=True) for o in outs]
            totals = [None] * len(outs)
            if rewards:  # the whole chunk at once: a reward model scores it in batches
                totals, _ = score_rewards(rewards, [Completion(t, len(o), is_truncated(o, eos))
                                                    for t, o in zip(decoded, outs)],
                                          [rows[s + i // args.k] for i in range(len(outs))])
            for p, (messages, answer) in enumerate(chunk):
                group = outs[p * args.k:(p + 1) * args.k]
                texts = decoded[p * args.k:(p + 1) * args.k]
                graded = grade_all(texts, [answer] * len(texts), args.answer_timeout)
                samples = [{"text": text, "correct": verdict, "truncated": is_truncated(o, eos)}
                           for o, text, (_, verdict) in zip(group, texts, graded)]
                reward_of: dict[str, float | None] = {}  # with --reward: equal texts get the first one's score (a
                if rewards:  # batch's padding may move a reward model's score in its last bits)
                    for x, total in zip(samples, totals[p * args.k:(p + 1) * args.k]):
                        x["reward"] = reward_of.setdefault(x["text"], total)
                    scored["all"] += [x["reward"] for x in samples if x["reward"] is not None]
                stats["completions"] += len(samples)
                stats["correct"] += sum(x["correct"] is True for x in samples)
                stats["truncated"] += sum(x["truncated"] for x in samples)
                stats["timed_out"] += sum(x["correct"] is None for x in samples)
                keep, pairs = split_samples(samples, args.max_per_problem, args.max_pairs_per_problem,
                                            args.keep_truncated, ranked=rewards is not None)
                stats["problems_with_correct"] += bool(keep)
                stats["problems_with_pair"] += bool(pairs)
                for text in keep:
                    row = {"messages": messages + [{"role": "assistant", "content": text}], "answer": answer}
                    if rewards:
                        row["reward"] = reward_of[text]
                        scored["sft"] += [reward_of[text]] if reward_of[text] is not None else []
                    sft_file.write(json.dumps(row) + "\n")
                for good, bad in pairs:
                    row = {"prompt": messages, "chosen": messages + [{"role": "assistant", "content": good}],
                           "rejected": messages + [{"role": "assistant", "content": bad}], "answer": answer}
                    if rewards:
                        row["score_chosen"], row["score_rejected"] = reward_of[good], reward_of[bad]
                    pair_file.write(json.dumps(row) + "\n")
                stats["sft_rows"] += len(keep)
                stats["pair_rows"] += len(pairs)
            print(f"{min(s + per_batch, len(problems))}/{len(problems)} problems, {stats['correct']} correct of "
                  f"{stats['completions']}", flush=True)
    if rewards:
        stats["reward_mean"] = sum(scored["all"]) / len(scored["all"]) if scored["all"] else None
        stats["sft_reward_mean"] = sum(scored["sft"]) / len(scored["sft"]) if scored["sft"] else None
    stats["seconds"] = time.perf_counter() - start
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"wrote {stats['sft_rows']} SFT rows to {out / 'sft.jsonl'} and {stats['pair_rows']} pairs to "
          f"{out / 'pairs.jsonl'}; {stats['correct']}/{stats['completions']} completions correct, "
          f"{stats['problems_with_correct']}/{stats['problems']} problems with a correct one")
    return stats


if __name__ == "__main__":
    main()
