"""Evaluate one or more checkpoints; one table row per --model, and a JSON file with every figure.

    python eval.py --metric accuracy --model runs/dft/final --data lab:test-hard --k 4 --temperature 1.0
    python eval.py --metric nll --model lab --model runs/sft/final --data lab:test
    python eval.py --metric token-probs --model runs/sft/final --model runs/dft/final --data lab:train
    python eval.py --metric deviation --model runs/minor/final --ref-model lab --data lab:test
    python eval.py --metric accuracy --model Qwen/Qwen2.5-0.5B-Instruct --data math500/test.jsonl --k 16
    python eval.py --metric accuracy --completions other_engine.jsonl --samples-out graded.jsonl

Metrics:
  accuracy     k samples per problem at --temperature with sample.py's batched generation (each prompt prefilled
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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data.collate import collate
from data.datasets import load_rows, tokenize_rows
from data.answers import DEFAULT_TIMEOUT_S, grade, normalize_answer, prompt_and_answer, reference_answer
from data.lab import LAB_BASE_DIR, is_lab_spec
from data.tokenizer import load_tokenizer
from losses.logprobs import sequence_logprobs
from model import UserError, default_device, load_model
from sample import generate, generation_eos_ids

METRICS = ("accuracy", "nll", "token-probs", "deviation")
PROB_BINS = np.array([0.0, 1e-3, 1e-2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0 + 1e-9])


def model_spec(name: str) -> str:
    """`lab` names the lab's base checkpoint; anything else is a directory or hub id."""
    return str(LAB_BASE_DIR) if name == "lab" else name


# ---- accuracy -----------------------------------------------------------------------------------------------------

def add_instruction(messages: list[dict], instruction: str) -> list[dict]:
    """The prompt with `instruction` appended to its last user turn (nothing when it is empty)."""
    if not instruction:
        return messages
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [dict(m, content=m["content"] + "\n" + instruction) if i == last_user else m for i, m in enumerate(messages)]


def accuracy(model, model_dir: Path, tok, rows, args) -> tuple[dict, list[dict]]:
    problems = [prompt_and_answer(row, rows.where(i) if hasattr(rows, "where") else f"row {i + 1}")
                for i, row in enumerate(rows)]
    # Lab rows carry their own system prompt; MATH-500 / GSM8K questions get the step-by-step instruction.
    instruction = "" if is_lab_spec(args.data) else args.instruction
    eos = sorted(set(generation_eos_ids(model_dir, model)) | {tok.im_end_id})
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
        for j, out in enumerate(outs):
            p, sample = s + j // args.k, j % args.k
            text = tok.decode(out, skip_special_tokens=True)
            pred, verdict = grade(text, problems[p][1], args.answer_timeout)
            verdicts[p].append(verdict)
            predictions[p].append(pred)
            n_tokens += len(out)
            records.append({"problem": p, "sample": sample, "answer": problems[p][1], "prediction": pred,
                            "correct": verdict is True, "timed_out": verdict is None, "completion": text,
                            "tokens": len(out), "truncated": not (out and out[-1] in eos)})
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
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e}).") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n}: a row must be a JSON object.")
        completions = row.get("completion")
        completions = [completions] if isinstance(completions, str) else completions
        if not isinstance(completions, list) or not completions or not all(isinstance(c, str) for c in completions):
            raise UserError(f"{path} line {n}: 'completion' must be a string or a non-empty list of strings.")
        ref = reference_answer({k: v for k, v in row.items() if k != "completion"})
        if ref is None:
            raise UserError(f"{path} line {n}: no reference answer ('answer', '#### N' or a \\boxed{{}} in "
                            "'solution'); add one.")
        verdicts.append([])
        predictions.append([])
        for sample, text in enumerate(completions):
            pred, verdict = grade(text, ref, args.answer_timeout)
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
    if not examples:
        raise UserError(f"{args.data} yields no response token to score; check its layout and --max-len.")
    return examples


@torch.no_grad()
def per_token_logps(model, tok, examples, batch_size: int) -> list[torch.Tensor]:
    """For each example, the log-probs of its response tokens (1-D, fp32, CPU)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk, tok.pad_token_id).items()}
        logps = sequence_logprobs(model, batch).float()  # (B, T)
        keep = batch["loss_mask"].bool()
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metric", choices=METRICS, default="accuracy")
    ap.add_argument("--model", action="append", default=None,
                    help="checkpoint dir, hub id or 'lab'; repeat to compare (not with --completions)")
    ap.add_argument("--completions", default=None, help="accuracy without a model: a JSONL file of rows with a "
                    "reference answer and a 'completion' string or list of strings, produced elsewhere")
    ap.add_argument("--data", default="lab:test", help="dataset spec (file, directory, hub id, lab[:split])")
    ap.add_argument("--split", default="test", help="split of a hub or directory dataset")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument("--ref-model", default=None, help="reference model for --metric deviation")
    g = ap.add_argument_group("generation (accuracy)")
    g.add_argument("--k", type=int, default=4, help="samples per problem (avg@k, pass@k, maj@k; >= 1, default 4)")
    g.add_argument("--instruction", default="Please reason step by step, and put your final answer within \\boxed{}.",
                   help="appended to each question of non-lab data (default: Qwen2.5-Math's step-by-step "
                   "instruction; '' for none)")
    g.add_argument("--answer-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds per answer check; a check that runs out counts as wrong and is reported (> 0)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per forward / generation batch")
    ap.add_argument("--max-len", type=int, default=1024, help="truncate scored examples to this many tokens")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON results file (default: eval_<metric>.json)")
    ap.add_argument("--samples-out", default=None, help="accuracy: JSONL of every generation "
                    "(default: next to --out)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.completions:
        return run_completions(args)
    if not args.model:
        raise UserError("give --model (a checkpoint to evaluate) or, for accuracy, --completions FILE.jsonl.")
    if args.k < 1:
        raise UserError(f"--k {args.k} is out of range; it must be >= 1.")
    if args.answer_timeout <= 0:
        raise UserError(f"--answer-timeout {args.answer_timeout} is out of range; it must be > 0.")
    if args.metric == "deviation" and not args.ref_model:
        raise UserError("--metric deviation needs --ref-model (the model to measure the deviation from).")
    device = args.device or default_device()
    rows = load_rows(args.data, args.split)
    if args.limit:
        rows = rows[:args.limit]  # a plain list: rows are then named by position in errors
    out = Path(args.out or f"eval_{args.metric.replace('-', '_')}.json")
    results: dict[str, dict] = {}
    ref_logps = None
    if args.metric == "deviation":
        ref, ref_dir = load_model(model_spec(args.ref_model), args.dtype, device)
        ref_tok = load_tokenizer(ref_dir)
        ref_logps = per_token_logps(ref, ref_tok, response_examples(ref_tok, rows, args), args.batch_size)
        del ref
    all_records = {}
    for name in args.model:
        model, model_dir = load_model(model_spec(name), args.dtype, device)
        tok = load_tokenizer(model_dir)
        if args.metric == "accuracy":
            results[name], all_records[name] = accuracy(model, model_dir, tok, rows, args)
        else:
            logps = per_token_logps(model, tok, response_examples(tok, rows, args), args.batch_size)
            if args.metric == "nll":
                results[name] = nll(logps)
            elif args.metric == "token-probs":
                results[name] = token_probs(logps)
            else:
                results[name] = deviation(logps, ref_logps)
        del model
    print_table(args.metric, results)
    payload = {"metric": args.metric, "data": args.data, "rows": len(rows), "results": results,
               "settings": {k: v for k, v in vars(args).items() if k not in ("model",)}}
    if args.metric == "token-probs":
        payload["bins"] = [bin_label(i) for i in range(len(PROB_BINS) - 1)]
        png = out.with_suffix(".png")
        if plot_token_probs(results, png):
            print(f"histogram plot: {png}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {out}")
    if all_records:
        samples = Path(args.samples_out or out.with_name(out.stem + "_samples.jsonl"))
        with open(samples, "w") as f:
            for name, records in all_records.items():
                for r in records:
                    f.write(json.dumps({"model": name, **r}) + "\n")
        print(f"generations: {samples}")
    return payload


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
