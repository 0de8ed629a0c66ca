"""Evaluate one or more checkpoints; one table row per --model, and a JSON file with every figure.

    python eval.py --metric accuracy --model runs/dft/final --data lab:test-hard --k 4 --temperature 1.0
    python eval.py --metric nll --model lab --model runs/sft/final --data lab:test
    python eval.py --metric token-probs --model runs/sft/final --model runs/dft/final --data lab:train
    python eval.py --metric deviation --model runs/minor/final --ref-model lab --data lab:test
    python eval.py --metric preference --model lab --model runs/dpo/final --ref-model lab --data lab:test:preference
    python eval.py --metric responses --model lab --model runs/dpo/final --data lab:test:prompt --limit 5
    python eval.py --metric reward --model runs/rm/final --data lab:test:preference --samples-out pairs.jsonl
    python eval.py --metric winrate --reward-model runs/rm/final --model lab --model runs/dpo/final --limit 100
    python eval.py --metric bleu --model lab --model runs/sft/final --data lab:test --limit 50
    python eval.py --metric accuracy --model Qwen/Qwen2.5-0.5B-Instruct --data math500/test.jsonl --k 16
    python eval.py --metric accuracy --completions other_engine.jsonl --samples-out graded.jsonl

Metrics:
  accuracy     k samples per problem at --temperature with model/generate.py's batched generation (each prompt prefilled
               once); a completion's answer is its last \\boxed{} (else GSM8K's '#### N'), checked against the
               row's reference answer by data/answers.py (math-verify), the checker of the GRPO rewards.
               avg@k = mean fraction of correct samples (the DFT paper's avg@16); pass@k = share of problems with
               at least one correct sample; maj@k = share whose most common answer is correct. Non-lab questions
               get --instruction (step by step, boxed) appended. Generations go to a JSONL file. With
               --completions, completions made elsewhere are graded without loading any model.
  nll          mean NLL of the response tokens (assistant turns; every token for text rows) and its perplexity.
  token-probs  the distribution of p(target token) over the response tokens, as the DFT paper's Figure 2: a
               histogram table (and a PNG when matplotlib is installed).
  deviation    MinorSFT's m_theta (its Eq. 8) against --ref-model: the mean over responses of the per-token
               log-ratio log pi_theta(y|x) - log pi_ref(y|x).
  preference   on preference pairs (data/preference.py layouts; ties dropped unless --keep-ties): paper 000's
               Eq. 4 accuracy, the share of pairs with log pi(y_w|x) > log pi(y_l|x) (sums over the response
               tokens); the same with per-token mean log-probs (length-normalised); and with --ref-model the
               implicit-reward accuracy, log pi/pi_ref(y_w|x) > log pi/pi_ref(y_l|x) (DPO's reward accuracy).
  responses    each --model's reply to the same prompts (the first --limit rows of --data), written side by side
               to a Markdown file next to --out, as papers 000 and 004 show them; --temperature 0 is greedy. When
               every row carries a reference reply, also the BLEU of the replies (as --metric bleu).
  reward       --model is a reward model (model/qwen2.py's Qwen2ForSequenceClassification, one output), scoring
               preference pairs (data/preference.py layouts and rules, each pair tokenized with the reward model's
               own tokenizer): accuracy = share of pairs with r(chosen) > r(rejected), the mean margin
               r(chosen) - r(rejected) and the mean scores; --samples-out: one row per pair, in input order.
  winrate      each --model answers every prompt (greedy unless --temperature; --k samples per prompt), the
               --reward-model scores each answer (training/reward_scoring.py), and each model's answer is compared
               with the FIRST model's answer to the same prompt and sample: win 1, tie 0.5 (identical answers are
               scored once, so they tie), loss 0. Win rate = mean of those, with a 95% percentile bootstrap interval
               over prompts (BOOTSTRAP_RESAMPLES resamples of the prompts, with replacement, seeded by --seed);
               the first model against itself is exactly 0.5 [0.5, 0.5]. Also the mean reward and the mean answer
               length in characters (comparable across tokenizers) and in the model's own tokens (the stop token
               included). When every row carries a reference reply (e.g. lab:test), also the BLEU of the
               answers (as --metric bleu). --samples-out: one row per prompt and sample.
  bleu         each --model answers every prompt (as winrate) and its answers are scored against the rows'
               reference replies (the last assistant turn, 'completion', 'solution', or the 'chosen' reply) by
               corpus BLEU-1, -2 and -4 on sacrebleu's 0-100 scale, computed as sacrebleu computes it (13a
               tokenization, clipped n-gram counts summed over the corpus, uniform weights, brevity penalty, its
               'exp' smoothing of an order with no match); see corpus_bleu. A row without a reference reply is
               refused before any model loads. --samples-out: each answer and its reference.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cli import (NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, TOP_P, Parser, Range, device_name, model_spec,
                 output_file, output_problem, refuse)
from data.answers import DEFAULT_TIMEOUT_S, grade_all, normalize_answer, reference_answer
from data.collate import collate
from data.datasets import (detect_layout, load_rows, prompt_and_answer, prompt_turns, read_jsonl, row_location,
                           row_to_messages, tokenize_rows)
from data.lab import is_lab_spec
from data.preference import collate_pairs, pair_messages, tokenize_preference_rows
from data.rewards import MODEL_PREFIX
from data.tokenizer import load_tokenizer
from losses.logprobs import sequence_scores
from model import UserError, default_device, load_model, load_reward_model
from model.generate import generate, is_truncated, stop_ids
from training.inference import batched_logprobs
from training.reward_scoring import RewardModelScorer

METRICS = ("accuracy", "nll", "token-probs", "deviation", "preference", "responses", "reward", "winrate", "bleu")
DEFAULT_DATA = "lab:test"
# bleu and winrate read lab:test itself: its chats carry the reference replies (winrate's BLEU column)
LAB_LAYOUT_OF_METRIC = {"preference": "preference", "responses": "prompt", "reward": "preference"}
GREEDY_BY_DEFAULT = ("winrate", "bleu")  # --temperature 0 and --k 1 unless given; accuracy samples 4 at 1.0
BOOTSTRAP_RESAMPLES = 1000
BLEU_ORDERS = (1, 2, 4)
PROB_BINS = np.array([0.0, 1e-3, 1e-2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0 + 1e-9])


# ---- accuracy -----------------------------------------------------------------------------------------------------

def add_instruction(messages: list[dict], instruction: str) -> list[dict]:
    """The prompt with `instruction` appended to its last user turn (nothing when it is empty)."""
    if not instruction:
        return messages
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [dict(m, content=m["content"] + "\n" + instruction) if i == last_user else m for i, m in enumerate(messages)]


def accuracy(model, model_dir: Path, tok, rows, args) -> tuple[dict, list[dict]]:
    problems = [prompt_and_answer(row, row_location(rows, i, source=None)) for i, row in enumerate(rows)]
    # Lab rows carry their own system prompt; MATH-500 / GSM8K questions get the step-by-step instruction.
    instruction = "" if is_lab_spec(args.data) else args.instruction
    eos = stop_ids(model_dir, model, tok.im_end_id)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    verdicts: list[list[bool | None]] = [[] for _ in problems]
    predictions: list[list[str | None]] = [[] for _ in problems]
    records = []
    n_tokens, start = 0, time.perf_counter()
    per_batch = max(1, args.batch_size // args.k)
    for s in range(0, len(problems), per_batch):
        chunk = problems[s:s + per_batch]
        prompts = [tok.encode_prompt(add_instruction(messages, instruction)) for messages, _ in chunk]
        outs = generate(model, prompts, args.max_new_tokens, eos, args.temperature, args.top_k, args.top_p,
                        tok.pad_token_id, generator, num_samples=args.k)
        texts = [tok.decode(out, skip_special_tokens=True) for out in outs]
        answers = [problems[s + j // args.k][1] for j in range(len(outs))]  # prompt 0's k samples, then prompt 1's
        graded = grade_all(texts, answers, args.answer_timeout)
        for j, (out, text, (pred, verdict)) in enumerate(zip(outs, texts, graded)):
            p, sample = s + j // args.k, j % args.k
            verdicts[p].append(verdict)
            predictions[p].append(pred)
            n_tokens += len(out)
            records.append({"problem": p, "sample": sample, "answer": answers[j], "prediction": pred,
                            "correct": verdict is True, "timed_out": verdict is None, "completion": text,
                            "tokens": len(out), "truncated": is_truncated(out, eos)})
    result = summarize_groups(verdicts, predictions)
    result["gen_tokens_per_s"] = n_tokens / (time.perf_counter() - start)
    return result, records


def summarize(correct: np.ndarray, predictions: list[str | None]) -> dict:
    """avg@k, pass@k and maj@k of a (problems, k) boolean matrix and its row-major predictions (see
    summarize_groups)."""
    k = correct.shape[1]
    return summarize_groups([list(map(bool, row)) for row in correct],
                            [predictions[p * k:(p + 1) * k] for p in range(correct.shape[0])])


def majority_index(predictions: list[str | None]) -> int | None:
    """The sample whose answer is the most common among a problem's samples (answers compared in normal form,
    data/answers.normalize_answer; ties go to the answer seen first); None when no sample has an answer."""
    keys = [normalize_answer(p) if p is not None else None for p in predictions]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)


def summarize_groups(verdicts: list[list[bool | None]], predictions: list[list[str | None]]) -> dict:
    """Per problem, its samples' verdicts (True / False / None for a check that timed out, counted as wrong) and
    extracted answers. avg@k = mean share of correct samples (the DFT paper's avg@16); pass@k = share of problems
    with a correct sample; maj@k = share of problems whose most common answer is correct (self-consistency).
    k is the samples per problem; with unequal numbers the keys say @n."""
    sizes = {len(v) for v in verdicts}
    k = sizes.pop() if len(sizes) == 1 else "n"
    majority = [majority_index(p) for p in predictions]
    flat = [p for ps in predictions for p in ps]
    return {f"avg@{k}": float(np.mean([np.mean([v is True for v in vs]) for vs in verdicts])),
            f"pass@{k}": float(np.mean([any(v is True for v in vs) for vs in verdicts])),
            f"maj@{k}": float(np.mean([m is not None and vs[m] is True for vs, m in zip(verdicts, majority)])),
            "problems": len(verdicts), "samples": len(flat),
            "boxed_rate": float(np.mean([p is not None for p in flat])) if flat else 0.0,
            "timed_out": sum(v is None for vs in verdicts for v in vs)}


def score_completions(args) -> tuple[dict, list[dict]]:
    """--completions FILE.jsonl: grade completions produced elsewhere, with no model. Each row carries its reference
    answer as the data layouts do ('answer', GSM8K's '... #### N', or a solution with a \\boxed{}) and 'completion':
    a string or a list of strings."""
    path = Path(args.completions)
    if not path.is_file():
        raise UserError(f"--completions {path} does not exist.")
    verdicts, predictions, records = [], [], []
    for n, row in read_jsonl(path):
        completions = row.get("completion")
        completions = [completions] if isinstance(completions, str) else completions
        if not isinstance(completions, list) or not completions or not all(isinstance(c, str) for c in completions):
            raise UserError(f"{path}, line {n}: 'completion' must be a string or a non-empty list of strings.")
        ref = reference_answer({k: v for k, v in row.items() if k != "completion"})
        if ref is None:
            raise UserError(f"{path}, line {n}: no reference answer ('answer', '#### N' or a \\boxed{{}} in "
                            "'solution'); add one.")
        verdicts.append([])
        predictions.append([])
        for sample, (pred, verdict) in enumerate(grade_all(completions, [ref] * len(completions),
                                                           args.answer_timeout)):
            verdicts[-1].append(verdict)
            predictions[-1].append(pred)
            records.append({"line": n, "problem": len(verdicts) - 1, "sample": sample, "answer": ref,
                            "prediction": pred, "correct": verdict is True, "timed_out": verdict is None})
    if not verdicts:
        raise UserError(f"--completions {path} holds no rows.")
    return summarize_groups(verdicts, predictions), records


# ---- per-token metrics ------------------------------------------------------------------------------------------

def response_examples(tok, rows, args):
    examples, stats = tokenize_rows(rows, tok, args.max_len, source=args.data)
    if stats["empty_replies"]:
        print(f"note: {stats['empty_replies']} rows of {args.data} not scored: every assistant reply is empty")
    if not examples:
        raise UserError(f"{args.data} yields no response token to score; check its layout and --max-len.")
    return examples


def per_token_logps(model, tok, examples, batch_size: int) -> list[torch.Tensor]:
    """For each example, the log-probs of its response tokens (1-D, fp32, CPU)."""
    out = []
    for chunk, batch, logps in batched_logprobs(model, examples, lambda c: collate(c, tok.pad_token_id), batch_size):
        keep = batch["loss_mask"].bool()  # logps (B, T)
        out += [logps[r][keep[r]].cpu() for r in range(len(chunk))]
    return out


def nll(logps: list[torch.Tensor]) -> dict:
    total = torch.cat(logps)
    mean = float(-total.mean())
    return {"nll": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": int(total.numel())}


def token_probs(logps: list[torch.Tensor]) -> dict:
    p = torch.cat(logps).exp().numpy()
    counts, _ = np.histogram(p, bins=PROB_BINS)
    return {"tokens": int(p.size), "mean_p": float(p.mean()), "median_p": float(np.median(p)),
            "share_below_0.1": float((p < 0.1).mean()), "histogram": (counts / max(p.size, 1)).tolist()}


def deviation(logps: list[torch.Tensor], ref_logps: list[torch.Tensor]) -> dict:
    per_token = [float((a - b).mean()) for a, b in zip(logps, ref_logps)]
    seq = [float((a - b).sum()) for a, b in zip(logps, ref_logps)]
    return {"deviation": float(np.mean(per_token)), "seq_log_ratio": float(np.mean(seq)), "responses": len(seq)}


# ---- preference pairs and side-by-side responses ------------------------------------------------------------

def preference_pairs(tok, rows, args) -> list:
    pairs, stats = tokenize_preference_rows(rows, tok, args.max_len, source=args.data, keep_ties=args.keep_ties)
    if not pairs:
        raise UserError(f"{args.data} yields no preference pair to score ({stats['ties']} ties dropped, "
                        f"{stats['dropped_empty']} with nothing left after --max-len {args.max_len}).")
    return pairs


def pair_sums(model, tok, pairs, batch_size: int) -> dict[int, tuple[tuple, float, float, float, float]]:
    """Per pair index: (its token ids, log pi(y_w|x), log pi(y_l|x), |y_w|, |y_l|), sums over the response tokens."""
    out = {}
    for chunk, batch, logps in batched_logprobs(model, pairs, lambda c: collate_pairs(c, tok.pad_token_id),
                                                batch_size):
        seq = logps.sum(1).cpu()  # (2P,) one sequence per row
        length = batch["loss_mask"].sum(1).cpu()  # (2P,)
        c, r = batch["chosen_seq"].cpu(), batch["rejected_seq"].cpu()
        for k, pair in enumerate(chunk):
            ids = (tuple(pair.chosen.input_ids), tuple(pair.rejected.input_ids))
            out[pair.index] = (ids, float(seq[c[k]]), float(seq[r[k]]), float(length[c[k]]), float(length[r[k]]))
    return out


def preference(sums: dict, ref_sums: dict | None) -> dict:
    """Paper 000's Eq. 4 accuracy, its length-normalised form, and (with the reference) the reward accuracy."""
    rows = list(sums.values())
    result = {"pairs": len(rows),
              "accuracy": float(np.mean([lc > lr for _, lc, lr, _, _ in rows])),
              "accuracy_length_normalized": float(np.mean([lc / mc > lr / mr for _, lc, lr, mc, mr in rows])),
              "logp_chosen": float(np.mean([lc for _, lc, _, _, _ in rows])),
              "logp_rejected": float(np.mean([lr for _, _, lr, _, _ in rows]))}
    if ref_sums is not None:
        wins = []
        for index, (ids, lc, lr, _, _) in sums.items():
            ref_ids, rc, rr, _, _ = ref_sums[index]
            if ids != ref_ids:
                raise UserError("--ref-model tokenizes the pairs differently from --model; implicit rewards need "
                                "the same tokenizer (use a reference from the same model family).")
            wins.append((lc - rc) > (lr - rr))
        result["reward_accuracy"] = float(np.mean(wins))
    return result


def prompt_of(row: dict, where: str) -> list[dict]:
    """The prompt turns of a row of any layout: a preference pair's shared turns (the pair checked as
    data/preference.py checks it), else data.datasets.prompt_turns (`prompt`, or a chat's turns up to its last
    non-assistant one)."""
    if "chosen" in row and "rejected" in row:
        return pair_messages(row, where)[0]
    if "prompt" not in row and detect_layout(row, where) == "text":
        raise UserError(f"{where}: a plain text row has no prompt; use a chat, prompt or preference layout.")
    return prompt_turns(row, where)


def responses(model, model_dir: Path, tok, prompts: list[list[dict]], args, k: int = 1
              ) -> tuple[list[str], list[int]]:
    """k answers to each prompt (prompt 0's k, then prompt 1's, ...) at --temperature, the generator seeded with
    --seed for every model, and their lengths in generated tokens (the stop token included)."""
    eos = stop_ids(model_dir, model, tok.im_end_id)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    texts, lengths = [], []
    per_batch = max(1, args.batch_size // k)
    for s in range(0, len(prompts), per_batch):
        ids = [tok.encode_prompt(p) for p in prompts[s:s + per_batch]]
        outs = generate(model, ids, args.max_new_tokens, eos, args.temperature, args.top_k, args.top_p,
                        tok.pad_token_id, generator, num_samples=k)
        texts += [tok.decode(out, skip_special_tokens=True) for out in outs]
        lengths += [len(out) for out in outs]
    return texts, lengths


def answer_lengths(texts: list[str], lengths: list[int]) -> dict:
    """Mean answer length in characters (comparable across tokenizers) and in the model's own generated tokens."""
    return {"answers": len(texts), "mean_chars": float(np.mean([len(t) for t in texts])) if texts else 0.0,
            "mean_tokens": float(np.mean(lengths)) if lengths else 0.0}


def responses_markdown(prompts: list[list[dict]], answers: dict[str, list[str]], args) -> str:
    """One section per prompt: the prompt's last user turn, then each model's reply under the model's name."""
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seed {args.seed}"
    lines = ["# Responses side by side", "",
             f"Data: `{args.data}`, {len(prompts)} prompts; {how}; at most {args.max_new_tokens} new tokens.", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## Prompt {i + 1}", ""]
        lines += ["> " + line for line in prompt[-1]["content"].splitlines() or [""]]
        lines.append("")
        for name, texts in answers.items():
            lines += [f"**{name}**", "", "````text", texts[i].rstrip(), "````", ""]
    return "\n".join(lines)


# ---- reward models: pairs, and judging answers -------------------------------------------------------------

def reward_pair_scores(model, tok, pairs, batch_size: int) -> list[tuple[int, float, float]]:
    """(row index, r(chosen), r(rejected)) of each pair, in input order: the reward model's score at each sequence's
    last token (losses/logprobs.py's sequence_scores), a batch's chosen and rejected sequences in one forward, as
    the reward loss sees them in training."""
    out = []
    for chunk, batch, scores in batched_logprobs(model, pairs, lambda c: collate_pairs(c, tok.pad_token_id),
                                                 batch_size, per_token=sequence_scores):
        reward = scores.sum(1).cpu()  # (2P,) each row's only non-zero entry is its last real token's score
        c, r = batch["chosen_seq"].cpu(), batch["rejected_seq"].cpu()  # (P,), (P,)
        out += [(pair.index, float(reward[c[k]]), float(reward[r[k]])) for k, pair in enumerate(chunk)]
    return out


def reward_accuracy(scores: list[tuple[int, float, float]]) -> dict:
    """Pairwise accuracy (r(chosen) > r(rejected); a tie counts as wrong, as in the reward loss's accuracy), the
    mean margin r(chosen) - r(rejected), and the mean scores."""
    chosen = np.array([c for _, c, _ in scores])
    rejected = np.array([r for _, _, r in scores])
    return {"pairs": len(scores), "accuracy": float(np.mean(chosen > rejected)),
            "margin": float(np.mean(chosen - rejected)), "score_chosen": float(chosen.mean()),
            "score_rejected": float(rejected.mean())}


def check_reward_models(names: list[str], dtype: str | None) -> None:
    """Refuse, before the first is scored, any --model that is not a reward model with a 1-output head: each is
    loaded on the meta device (its files read and checked, no weights kept)."""
    for name in names:
        load_reward_model(model_spec(name), dtype, "meta")


def answer_rewards(scorer: RewardModelScorer, prompts: list[list[dict]], answers: dict[str, list[str]], k: int
                   ) -> dict[str, np.ndarray]:
    """Each model's rewards, (prompts, k). An answer is scored once per prompt however many models or samples gave
    it, so identical answers get the identical reward (a tie), whatever batch they would have been padded in."""
    unique: dict[tuple[int, str], int] = {}
    for texts in answers.values():
        for j, text in enumerate(texts):
            unique.setdefault((j // k, text), len(unique))
    scores = scorer.score([prompts[p] for p, _ in unique], [text for _, text in unique])
    return {name: np.array([scores[unique[(j // k, text)]] for j, text in enumerate(texts)]).reshape(len(prompts), k)
            for name, texts in answers.items()}


def outcomes(rewards: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per answer, against the first model's answer to the same prompt and sample: win 1, tie 0.5, loss 0."""
    return np.where(rewards > first, 1.0, np.where(rewards == first, 0.5, 0.0))


def win_rate(rewards: np.ndarray, first: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Win rate of (prompts, k) rewards against the first model's, and its 95% percentile bootstrap interval over
    prompts: `resamples` draws of the prompts with replacement (the same draws for every model, from `seed`), each
    draw's mean of the per-prompt win rates."""
    outcome = outcomes(rewards, first)  # (P, k)
    per_prompt = outcome.mean(1)  # (P,)
    draws = np.random.default_rng(seed).integers(0, len(per_prompt), size=(resamples, len(per_prompt)))  # (R, P)
    low, high = np.percentile(per_prompt[draws].mean(1), [2.5, 97.5])
    return {"win_rate": float(per_prompt.mean()), "ci95_low": float(low), "ci95_high": float(high),
            "wins": int((outcome == 1.0).sum()), "ties": int((outcome == 0.5).sum()),
            "losses": int((outcome == 0.0).sum()), "mean_reward": float(rewards.mean())}


# ---- BLEU, as sacrebleu computes it -------------------------------------------------------------------------

# sacrebleu's TokenizerRegexp rules, which its default '13a' tokenizer (mteval-v13a.pl's) applies.
_13A_RULES = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
              (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless after a digit
              (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma, unless before a digit
              (re.compile(r"([0-9])(-)"), r"\1 \2 ")]  # dash after a digit


def tokenize_13a(text: str) -> list[str]:
    """sacrebleu's default tokenization of one segment, as BLEU applies it (trailing whitespace stripped first)."""
    line = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def ngram_counts(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu_score(correct: Sequence[int], total: Sequence[int], hyp_len: int, ref_len: int, order: int) -> float:
    """sacrebleu's BLEU.compute_bleu with its defaults ('exp' smoothing, no effective order), on the 0-100 scale:
    BP * exp(mean over n = 1..order of log p_n), p_n = 100 * clipped matches / hypothesis n-grams. BP = exp(1 -
    ref_len / hyp_len) when the hypotheses are shorter (0 when empty), else 1. An order with n-grams but no match
    gets p_n = 100 / (2^j * total) for its j-th such order (mteval's smoothing); no match at any order, or an order
    with no n-gram at all (every hypothesis shorter than n), gives 0."""
    if not any(correct[:order]):
        return 0.0
    log_sum, smooth = 0.0, 1.0
    for n in range(order):
        if total[n] == 0:
            return 0.0  # sacrebleu floors log(0) at -9999999999, so exp(...) is 0
        if correct[n] == 0:
            smooth *= 2
            log_sum += math.log(100.0 / (smooth * total[n]))
        else:
            log_sum += math.log(100.0 * correct[n] / total[n])
    return brevity_penalty(hyp_len, ref_len) * math.exp(log_sum / order)


def brevity_penalty(hyp_len: int, ref_len: int) -> float:
    return 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], orders: Sequence[int] = BLEU_ORDERS) -> dict:
    """Corpus BLEU-n for each n in `orders` of hypotheses against one reference each, equal to sacrebleu's
    `BLEU(max_ngram_order=n).corpus_score(hypotheses, [references]).score`: per segment, 13a tokens, hypothesis
    n-gram counts clipped by the reference's, summed over the corpus with the lengths; then bleu_score. Also the
    brevity penalty and the corpus lengths in tokens."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    max_order = max(orders)
    correct, total = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        ref_ngrams = ngram_counts(ref, max_order)
        for ngram, count in ngram_counts(hyp, max_order).items():
            total[len(ngram) - 1] += count
            correct[len(ngram) - 1] += min(count, ref_ngrams[ngram])
    return {**{f"bleu{n}": bleu_score(correct, total, hyp_len, ref_len, n) for n in orders},
            "brevity_penalty": brevity_penalty(hyp_len, ref_len), "hyp_tokens": hyp_len, "ref_tokens": ref_len}


def reference_reply(row: dict, where: str) -> str | None:
    """The reply a row gives to its prompt, BLEU's reference: a preference row's chosen reply, else the reply turns
    after the prompt ('completion', 'solution', the 'answer' of question/answer rows, a chat's assistant turns);
    their last assistant turn. None for a row that is only a prompt (lab:...:prompt, 'prompt' + 'answer'), a chat
    that ends on a user turn, or an empty reply."""
    if "chosen" in row and "rejected" in row:
        reply = pair_messages(row, where)[1]
    elif "prompt" in row and "completion" not in row:
        return None
    else:
        messages = row_to_messages(row, detect_layout(row, where), where)
        if messages is None:  # a text row
            return None
        last_prompt_turn = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
        reply = messages[last_prompt_turn + 1:]
    texts = [m["content"] for m in reply if m["role"] == "assistant"]
    return texts[-1] if texts and texts[-1].strip() else None


def bleu_references(rows, args) -> list[str]:
    """Every row's reference reply; the first row without one is refused by name."""
    references = []
    for i, row in enumerate(rows):
        where = row_location(rows, i, source=args.data)
        reference = reference_reply(row, where)
        if reference is None:
            raise UserError(f"{where} has no reference reply (the last assistant turn, 'completion', 'solution' or "
                            f"the 'chosen' reply) to compute BLEU against; use rows that carry one.")
        references.append(reference)
    return references


# ---- reporting --------------------------------------------------------------------------------------------------

def bin_label(i: int) -> str:
    lo, hi = PROB_BINS[i], min(PROB_BINS[i + 1], 1.0)
    return f"[{lo:g}, {hi:g}{']' if i == len(PROB_BINS) - 2 else ')'}"


def print_table(metric: str, results: dict[str, dict]) -> None:
    if metric == "token-probs":
        names = list(results)
        print("p(target)".ljust(16) + "".join(n[-24:].rjust(26) for n in names))
        for i in range(len(PROB_BINS) - 1):
            print(bin_label(i).ljust(16) + "".join(f"{results[n]['histogram'][i]:26.4f}" for n in names))
        print("mean p".ljust(16) + "".join(f"{results[n]['mean_p']:26.4f}" for n in names))
        return
    first = next(iter(results.values()))
    keys = [k for k in first if not isinstance(first[k], list)]
    widths = [max(12, len(k) + 2) for k in keys]
    width = max(len(n) for n in results) + 2
    print("model".ljust(width) + "".join(k.rjust(w) for k, w in zip(keys, widths)))
    for name, r in results.items():
        cells = [f"{r[k]:{w}.4f}" if isinstance(r[k], float) else f"{r[k]:>{w}}" for k, w in zip(keys, widths)]
        print(name.ljust(width) + "".join(cells))


def plot_token_probs(results: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(PROB_BINS) - 1)
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        ax.bar(x + i * width, r["histogram"], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, [bin_label(i) for i in x], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share of response tokens")
    ax.set_xlabel("p(target token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_parser() -> Parser:
    ap = Parser(description=__doc__)
    ap.add_argument("--metric", choices=METRICS, default="accuracy", help="what to measure, see above")
    ap.add_argument("--model", action="append", default=None,
                    help="checkpoint dir, hub id or 'lab' (the lab's base model); repeat to compare (default: none; "
                    "one is required unless --completions is given); for --metric reward, a reward model; for "
                    "winrate, the first is the one every model is compared with")
    ap.add_argument("--completions", default=None, help="accuracy without a model: a JSONL file of "
                    "rows with a reference answer and a 'completion' string or list of strings, produced elsewhere "
                    "(default: none)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="dataset spec (file, directory, hub id, lab[:split][:layout]); "
                    "the default lab:test is read as lab:test:preference / lab:test:prompt by those metrics")
    ap.add_argument("--split", default="test", help="split of a directory or hub --data")
    ap.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N rows (default: all)")
    ap.add_argument("--ref-model", default=None,
                    help="reference model for --metric deviation (required) and preference (optional: adds the "
                    "implicit-reward accuracy) (default: none)")
    ap.add_argument("--keep-ties", action="store_true",
                    help="preference, reward: keep pairs whose score_chosen == score_rejected (default: drop them)")
    ap.add_argument("--reward-model", default=None,
                    help="winrate (required): the reward model that judges the answers, a checkpoint dir or hub id "
                    "of a Qwen2ForSequenceClassification with one output, e.g. written by train.py --loss reward; "
                    "model:DIR (GRPO's --reward spelling) is read as DIR (default: none)")
    g = ap.add_argument_group("generation (accuracy, responses, winrate, bleu)")
    g.add_argument("--k", type=POSITIVE_INT, default=None,
                   help="samples per problem (avg@k, pass@k, maj@k) or per prompt (winrate, bleu) (default: 4 for "
                   "accuracy, 1 for winrate and bleu)")
    g.add_argument("--instruction", default="Please reason step by step, and put your final answer within \\boxed{}.",
                   help="appended to each question of non-lab data (default: Qwen2.5-Math's step-by-step "
                   "instruction; '' for none)")
    g.add_argument("--answer-timeout", type=POSITIVE_FLOAT, default=DEFAULT_TIMEOUT_S,
                   help="seconds per answer check; a check that runs out counts as wrong and is reported")
    g.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=None,
                   help="0 = greedy (default: 1.0; 0 for winrate and bleu)")
    g.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus sampling: keep the top tokens holding this mass")
    g.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="keep the k most likely tokens (0: all)")
    g.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, help="longest completion")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the sampling (and of winrate's bootstrap)")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="sequences per forward / generation batch")
    ap.add_argument("--max-len", type=Range(int, low=2), default=1024, help="truncate scored examples to this many tokens")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--device", type=device_name, default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--out", type=output_file, default=None,
                    help="JSON results file (default: RUN/eval/CHECKPOINT_METRIC_DATA.json when the one --model is a "
                    "checkpoint of a train.py run RUN, else runs/eval/MODEL_METRIC_DATA.json)")
    ap.add_argument("--samples-out", type=output_file, default=None, help="JSONL: accuracy, every generation "
                    "(by default next to --out, *_samples.jsonl); reward, each pair's score_chosen and "
                    "score_rejected; winrate, each prompt's (and sample's) answers, rewards and outcomes against the "
                    "first model; bleu, each answer and its reference (written only when given, but for accuracy)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag and where the results go; refuses bad values before any model or data loads."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.completions and (args.model or args.metric != "accuracy"):
        refuse(ap, "--completions", "grades completions made elsewhere: it goes with --metric accuracy and no --model.")
    if not args.completions and not args.model:
        refuse(ap, "--model", "give one (a checkpoint to evaluate) or, for accuracy, --completions FILE.jsonl.")
    if args.metric == "deviation" and not args.ref_model:
        refuse(ap, "--ref-model", "--metric deviation needs it (the model to measure the deviation from).")
    if args.metric == "winrate" and not args.reward_model:
        refuse(ap, "--reward-model", "--metric winrate needs it (the reward model that judges the answers).")
    if args.reward_model and args.metric != "winrate":
        refuse(ap, "--reward-model", "only --metric winrate uses it (for --metric reward, the reward model is "
               "--model).")
    greedy = args.metric in GREEDY_BY_DEFAULT
    if args.temperature is None:
        args.temperature = 0.0 if greedy else 1.0
    if args.k is None:
        args.k = 1 if greedy else 4
    if greedy and args.k > 1 and args.temperature == 0:
        refuse(ap, "--k", f"{args.k} samples per prompt need --temperature > 0 (greedy answers are all the same).")
    if args.out is None:
        args.out = str(default_out(args.model or [args.completions], args.metric, args.data))
        problem = output_problem(args.out, want_dir=False)
        if problem:
            refuse(ap, "--out", f"the default results file cannot be written ({problem}); pass --out.")
    if args.metric == "accuracy" and args.samples_out is None:
        out = Path(args.out)
        args.samples_out = str(out.with_name(out.stem + "_samples.jsonl"))
        problem = output_problem(args.samples_out, want_dir=False)
        if problem:
            refuse(ap, "--samples-out", f"the default generations file cannot be written ({problem}); pass it.")
    return args


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def default_out(models: list[str], metric: str, data: str) -> Path:
    """Under the run folder of the model evaluated (the directory train.py wrote, holding args.json next to the
    checkpoint), else under runs/eval/; the name says what was measured on which data."""
    data_name = Path(data).stem if Path(data).is_file() else data
    what = f"{slug(metric)}_{slug(data_name)}.json"
    if len(models) == 1:
        checkpoint = Path(models[0])
        if models[0] != "lab" and checkpoint.is_dir() and (checkpoint.parent / "args.json").is_file():
            return checkpoint.parent / "eval" / f"{slug(checkpoint.name)}_{what}"
        name = checkpoint.resolve().name if models[0] != "lab" and checkpoint.is_dir() else models[0]
        return Path("runs") / "eval" / f"{slug(name)}_{what}"
    return Path("runs") / "eval" / f"{len(models)}models_{what}"


def data_record(args: argparse.Namespace) -> dict:
    """The data spec exactly as given; --split only where it applies (a directory or hub dataset)."""
    record = {"data": args.data}
    if not (is_lab_spec(args.data) or Path(args.data).is_file()):
        record["split"] = args.split
    return record


def run(args: argparse.Namespace) -> dict:
    if args.completions:
        return run_completions(args)
    if args.data == DEFAULT_DATA and args.metric in LAB_LAYOUT_OF_METRIC:  # the lab split in this metric's layout
        args.data = f"{DEFAULT_DATA}:{LAB_LAYOUT_OF_METRIC[args.metric]}"
    device = args.device or default_device()
    rows = load_rows(args.data, args.split)
    if args.limit:
        rows = rows[:args.limit]  # a plain list: rows are then named by position in errors
    out = Path(args.out)
    results: dict[str, dict] = {}
    ref_logps = None
    ref_sums = None
    if args.metric == "preference" and args.ref_model:
        ref, ref_dir = load_model(model_spec(args.ref_model), args.dtype, device)
        ref_tok = load_tokenizer(ref_dir)
        ref_sums = pair_sums(ref, ref_tok, preference_pairs(ref_tok, rows, args), args.batch_size)
        del ref
    generating = args.metric in ("responses", "winrate", "bleu")
    prompts = [prompt_of(row, row_location(rows, i, source=None)) for i, row in enumerate(rows)] if generating else []
    k = args.k if args.metric in ("winrate", "bleu") else 1
    references = None  # BLEU's, one per row: required by --metric bleu, used by responses when every row has one
    if args.metric == "bleu":
        references = bleu_references(rows, args)
    elif args.metric in ("responses", "winrate"):
        found = [reference_reply(row, row_location(rows, i, source=args.data)) for i, row in enumerate(rows)]
        references = found if found and all(r is not None for r in found) else None
    # Reward models are checked before any work: the judge is loaded first, several --model reward models on meta.
    scorer = (RewardModelScorer(model_spec(args.reward_model.removeprefix(MODEL_PREFIX)), device, args.batch_size)
              if args.reward_model else None)
    if args.metric == "reward" and len(args.model) > 1:
        check_reward_models(args.model, args.dtype)
    answers: dict[str, list[str]] = {}
    if args.metric == "deviation":
        ref, ref_dir = load_model(model_spec(args.ref_model), args.dtype, device)
        ref_tok = load_tokenizer(ref_dir)
        ref_logps = per_token_logps(ref, ref_tok, response_examples(ref_tok, rows, args), args.batch_size)
        del ref
    all_records = {}
    for name, label in zip(args.model, model_labels(args.model)):
        load = load_reward_model if args.metric == "reward" else load_model
        model, model_dir = load(model_spec(name), args.dtype, device)
        tok = load_tokenizer(model_dir)
        if args.metric == "accuracy":
            results[label], all_records[label] = accuracy(model, model_dir, tok, rows, args)
        elif args.metric == "preference":
            results[label] = preference(pair_sums(model, tok, preference_pairs(tok, rows, args), args.batch_size),
                                        ref_sums)
        elif args.metric == "reward":
            scores = reward_pair_scores(model, tok, preference_pairs(tok, rows, args), args.batch_size)
            results[label] = reward_accuracy(scores)
            all_records[label] = [{"row": i, "score_chosen": c, "score_rejected": r} for i, c, r in scores]
        elif generating:
            answers[label], lengths = responses(model, model_dir, tok, prompts, args, k)
            results[label] = {"prompts": len(prompts), **answer_lengths(answers[label], lengths)}
            if references is not None:  # each of a prompt's k answers against the row's reference
                results[label].update(corpus_bleu(answers[label], [r for r in references for _ in range(k)]))
            if args.metric == "bleu":
                all_records[label] = [{"row": j // k, "sample": j % k, "answer": text, "reference": references[j // k]}
                                      for j, text in enumerate(answers[label])]
        else:
            logps = per_token_logps(model, tok, response_examples(tok, rows, args), args.batch_size)
            if args.metric == "nll":
                results[label] = nll(logps)
            elif args.metric == "token-probs":
                results[label] = token_probs(logps)
            else:
                results[label] = deviation(logps, ref_logps)
        del model
    sample_rows = [{"model": label, **r} for label, records in all_records.items() for r in records]
    if args.metric == "winrate":
        results, sample_rows = judge(scorer, prompts, answers, results, args)
    print_table(args.metric, results)
    payload = {"metric": args.metric, **data_record(args), "rows": len(rows), "results": results,
               "settings": {k: v for k, v in vars(args).items() if k not in ("model", "data", "split")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.metric == "token-probs":
        payload["bins"] = [bin_label(i) for i in range(len(PROB_BINS) - 1)]
        png = out.with_suffix(".png")
        if plot_token_probs(results, png):
            print(f"histogram plot: {png}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.metric == "responses":
        payload["responses"] = [{"prompt": p, **{name: texts[i] for name, texts in answers.items()}}
                                for i, p in enumerate(prompts)]
        markdown = out.with_suffix(".md")
        markdown.write_text(responses_markdown(prompts, answers, args) + "\n")
        print(f"responses side by side: {markdown}")
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {out}")
    if sample_rows and args.samples_out:
        samples = Path(args.samples_out)
        samples.parent.mkdir(parents=True, exist_ok=True)
        with open(samples, "w") as f:
            for r in sample_rows:
                f.write(json.dumps(r) + "\n")
        what = {"accuracy": "generations", "reward": "per pair", "bleu": "answers"}.get(args.metric, "per prompt")
        print(f"{what}: {samples}")
    return payload


def model_labels(names: list[str]) -> list[str]:
    """Each --model's name in the results; a name given again is numbered ('lab', 'lab #2'), so that comparing a
    model with itself keeps both rows."""
    seen: Counter = Counter()
    labels = []
    for name in names:
        seen[name] += 1
        labels.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return labels


def judge(scorer: RewardModelScorer, prompts: list[list[dict]], answers: dict[str, list[str]],
          results: dict[str, dict], args) -> tuple[dict[str, dict], list[dict]]:
    """--metric winrate once every model has answered: each model's win rate against the first (and its interval,
    wins, ties, losses, mean reward) ahead of its answer lengths, and one row per prompt and sample."""
    rewards = answer_rewards(scorer, prompts, answers, args.k)
    first = rewards[next(iter(answers))]
    judged = {label: {**win_rate(r, first, args.seed), **results[label]} for label, r in rewards.items()}
    rows = []
    for p, prompt in enumerate(prompts):
        for sample in range(args.k):
            j = p * args.k + sample
            rows.append({"row": p, "sample": sample, "prompt": prompt,
                         "answers": {label: texts[j] for label, texts in answers.items()},
                         "rewards": {label: float(r[p, sample]) for label, r in rewards.items()},
                         "outcomes": {label: float(outcomes(r[p, sample], first[p, sample]))
                                      for label, r in rewards.items()}})
    return judged, rows


def run_completions(args: argparse.Namespace) -> dict:
    if args.metric != "accuracy" or args.model:
        raise UserError("--completions scores accuracy without a model: use it with --metric accuracy and no --model.")
    if args.answer_timeout <= 0:
        raise UserError(f"--answer-timeout {args.answer_timeout} is out of range; it must be > 0.")
    result, records = score_completions(args)
    print_table("accuracy", {args.completions: result})
    out = Path(args.out or "eval_accuracy.json")
    payload = {"metric": "accuracy", "completions": args.completions, "results": {args.completions: result}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    samples = Path(args.samples_out or out.with_name(out.stem + "_samples.jsonl"))
    with open(samples, "w") as f:
        for r in records:  # one row per completion, in input order
            f.write(json.dumps(r) + "\n")
    print(f"results: {out}\nper completion: {samples}")
    return payload


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
