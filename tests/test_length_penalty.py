"""Paper 004's SFT with a length penalty (losses/sft_length.py): values and gradients by hand, the score-function
estimator's unbiasedness by exact enumeration, lambda 0 == SFT, exact accumulation; train.py's flags and a short lab
run from the command line.

The hand-worked batch (`reply_and_samples`): one dataset sequence, the reply y of m = 2 tokens with log-probs
(-L, -2L) (L = ln 2), and k = 3 samples of its prompt with 2, 3 and 5 generated tokens, every sample token at
log-prob -1 (the value does not matter: the estimator's gradient is per token of a sample):

    costs       c = max(0, len(s) - 2)^2                    = (0, 1, 9)
    baselines   b_j = mean of the other two costs           = (5, 4.5, 0.5)
    advantages  c - b                                       = (-5, -3.5, 8.5)
    penalty     (1/k) sum_j c_j                             = 10/3
    sequence_sum with lambda = 0.1:
        loss    = 3L + 0.1 * 10/3 = 3L + 1/3, count 1 (one dataset sequence; samples never count)
        d loss / d logp: -1 on each reply token; lambda (c_j - b_j) / k on each token of sample j:
                 -1/6, -7/60, 17/60
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from training import batches, flags
from losses import LOSSES, SFT_NORMS, WITH_SAMPLES, hparams_for
from losses.sft import sft_loss
from losses.sft_length import sft_length_loss
from tests.conftest import LAB_IM_END, REPO_ROOT, write_tiny_lab_model
from tests.test_losses import GARBAGE, L, assert_close, run

SAMPLE_LENS = (2, 3, 5)


def reply_and_samples(sample_lens=SAMPLE_LENS, reply_logps=(-L, -2 * L), prompt_len: int = 2,
                      sample_logp: float = -1.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One dataset sequence (row 0: prompt, then the reply) and its samples (one row each: prompt, then the sample),
    right-padded with garbage under mask 0. length_target = len(reply) on every sample."""
    m = len(reply_logps)
    width = prompt_len + max(m, *sample_lens) + 1
    n = 1 + len(sample_lens)
    logps = torch.full((n, width), GARBAGE)
    mask = torch.zeros(n, width)
    ids = torch.full((n, width), -1)
    for row, (length, values) in enumerate([(m, list(reply_logps))]
                                           + [(s, [sample_logp] * s) for s in sample_lens]):
        ids[row, :prompt_len + length] = row
        logps[row, prompt_len:prompt_len + length] = torch.tensor(values)
        mask[row, prompt_len:prompt_len + length] = 1.0
    batch = {"sequence_ids": ids, "num_sequences": n, "sample_of": torch.tensor([-1] + [0] * len(sample_lens)),
             "length_target": torch.tensor([0.0] + [float(m)] * len(sample_lens))}
    return logps, mask, batch


def test_registered_with_its_hparams():
    assert LOSSES["sft_length"] is sft_length_loss and WITH_SAMPLES == {"sft_length"}
    flags = {"length_coef": 0.01, "sft_norm": "token", "beta": 0.1, "loss_agg": "token"}
    assert hparams_for("sft_length", flags) == {"length_coef": 0.01, "sft_norm": "token"}


# ---------------------------------------------------------------- by hand

def test_value_and_gradient_by_hand():
    logps, mask, batch = reply_and_samples()
    out, grad = run(sft_length_loss, logps, mask, batch, length_coef=0.1)
    assert_close(out.loss_sum, 3 * L + 1 / 3)
    assert out.count == 1.0
    expected = torch.zeros_like(grad)
    expected[0, 2:4] = -1.0
    for row, per_token in zip((1, 2, 3), (-1 / 6, -7 / 60, 17 / 60)):
        expected[row, 2:2 + SAMPLE_LENS[row - 1]] = per_token
    assert_close(grad, expected)
    assert_close(out.metrics["nll"], (3 * L, 2.0))
    assert_close(out.metrics["sample_len"], (10.0, 3.0))
    assert_close(out.metrics["length_target"], (6.0, 3.0))
    assert_close(out.metrics["length_penalty"], (0.1 * 10, 3.0))  # lambda * c, mean over the samples: 1/3
    assert_close(out.metrics["over_target"], (2.0, 3.0))


def test_each_reduction_weighs_the_penalty_like_its_sft_term():
    """token: sum_t nll + lambda m P, over m tokens; sequence_mean: mean nll + lambda P, over 1 sequence."""
    logps, mask, batch = reply_and_samples()
    out, grad = run(sft_length_loss, logps, mask, batch, length_coef=0.1, sft_norm="token")
    assert_close(out.loss_sum, 3 * L + 2 * (1 / 3))
    assert out.count == 2.0
    assert_close(grad[3, 2], 2 * 17 / 60)
    out, grad = run(sft_length_loss, logps, mask, batch, length_coef=0.1, sft_norm="sequence_mean")
    assert_close(out.loss_sum, 1.5 * L + 1 / 3)
    assert out.count == 1.0
    assert_close(grad[0, 2:4], [-0.5, -0.5])
    assert_close(grad[3, 2], 17 / 60)


def test_gradient_through_a_policy_is_the_score_function_estimator_by_hand():
    """A policy of one categorical over 3 tokens per position (logits theta, shared by every position): log pi of a
    token is theta_a - logsumexp(theta), whose gradient is onehot(a) - softmax(theta). The loss's gradient w.r.t.
    theta must equal  -sum_{t in y} (onehot(y_t) - p) + (lambda / k) sum_j (c_j - b_j) sum_{t in s_j} (onehot - p)."""
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    p = torch.softmax(theta.detach(), 0)
    reply, samples = [0, 2], [[1, 2], [0, 0, 2], [2, 1, 1, 0, 2]]  # lengths 2, 3, 5 as in the module docstring
    logp_table = torch.log_softmax(theta, 0)
    logps, mask, batch = reply_and_samples()
    logps = logps.clone()
    for row, tokens in enumerate([reply] + samples):
        for t, a in enumerate(tokens):
            logps = logps.index_put((torch.tensor(row), torch.tensor(2 + t)), logp_table[a])
    out = sft_length_loss(logps, mask, batch, length_coef=0.1)
    (grad,) = torch.autograd.grad(out.loss_sum, theta)

    def score(tokens):  # grad of log pi(tokens) w.r.t. theta, by hand
        return sum(torch.nn.functional.one_hot(torch.tensor(a), 3).float() - p for a in tokens)

    advantages = (-5.0, -3.5, 8.5)
    expected = -score(reply) + (0.1 / 3) * sum(a * score(s) for a, s in zip(advantages, samples))
    assert_close(grad, expected)


def test_the_estimator_is_unbiased_by_exact_enumeration():
    """A policy that continues with probability sigmoid(theta_t) at position t and stops (eos) otherwise, cut at 4
    tokens: 5 possible samples (e, ae, aae, aaae, aaaa) of lengths 1, 2, 3, 4, 4. With target len(y) = 1 and k = 2,
    the expectation of the loss's gradient over all 25 ordered pairs of samples, each weighted by its probability,
    equals grad_theta of lambda * E_s[c(s)] computed exactly. (The reply's SFT gradient is subtracted: lambda 0.)"""
    theta = torch.tensor([0.4, -0.3, 0.9, 0.1], dtype=torch.float64, requires_grad=True)
    lam = 0.5
    sequences = [[0] * n + [1] for n in range(4)] + [[0] * 4]  # 0 = continue ("a"), 1 = stop (eos)

    def token_logps(seq):
        cont = torch.nn.functional.logsigmoid(theta)
        stop = torch.nn.functional.logsigmoid(-theta)
        return torch.stack([cont[t] if a == 0 else stop[t] for t, a in enumerate(seq)])

    def seq_prob(seq):
        return float(token_logps(seq).detach().sum().exp())

    exact = lam * sum(token_logps(s).sum().exp() * max(0, len(s) - 1) ** 2 for s in sequences)
    (exact_grad,) = torch.autograd.grad(exact, theta)

    expected_grad = torch.zeros_like(theta)
    for s1, s2 in itertools.product(sequences, repeat=2):
        _, mask, batch = reply_and_samples(sample_lens=(len(s1), len(s2)), reply_logps=(-1.0,), prompt_len=1)
        logps = torch.zeros(mask.shape, dtype=torch.float64)
        for row, seq in ((1, s1), (2, s2)):
            logps = logps.index_put((torch.tensor(row), torch.arange(1, 1 + len(seq))), token_logps(seq))
        penalty = sft_length_loss(logps, mask, batch, length_coef=lam).loss_sum - 1.0  # minus the reply's NLL
        (g,) = torch.autograd.grad(penalty, theta)
        expected_grad += seq_prob(s1) * seq_prob(s2) * g
    assert_close(expected_grad, exact_grad, tol=1e-12)
    # The test has something to find: theta_0..2 move E[c]; theta_3 does not (aaae and aaaa are both 4 long).
    assert exact_grad[:3].abs().min() > 0.1 and exact_grad[3].abs() < 1e-12


def test_no_penalty_gradient_when_every_sample_is_at_or_below_the_reference_length():
    logps, mask, batch = reply_and_samples(sample_lens=(1, 2, 2))
    out, grad = run(sft_length_loss, logps, mask, batch, length_coef=1.0)
    sft_out, sft_grad = run(sft_loss, logps[:1], mask[:1], {**batch, "num_sequences": 1,
                                                             "sequence_ids": batch["sequence_ids"][:1]},
                            sft_norm="sequence_sum")
    assert (grad[1:] == 0).all()
    assert_close(grad[:1], sft_grad)
    assert_close(out.loss_sum, sft_out.loss_sum)
    assert out.metrics["length_penalty"][0] == 0.0 and out.metrics["over_target"][0] == 0.0


def test_equal_costs_over_the_target_give_zero_gradient_but_a_value():
    logps, mask, batch = reply_and_samples(sample_lens=(4, 4, 4))
    out, grad = run(sft_length_loss, logps, mask, batch, length_coef=0.1)
    assert (grad[1:] == 0).all()
    assert_close(out.loss_sum, 3 * L + 0.1 * 4)


def test_nan_and_inf_under_the_mask_never_reach_the_loss():
    logps, mask, batch = reply_and_samples()
    clean = torch.where(mask > 0, logps, 0.0)
    dirty = clean.clone()
    dirty[0, 0], dirty[1, -1], dirty[3, 0] = float("nan"), -float("inf"), 1e30
    out_clean, grad_clean = run(sft_length_loss, clean, mask, batch, length_coef=0.1)
    out_dirty, grad_dirty = run(sft_length_loss, dirty, mask, batch, length_coef=0.1)
    assert torch.isfinite(grad_dirty).all() and (grad_dirty[mask == 0] == 0).all()
    assert torch.equal(grad_dirty, grad_clean) and out_dirty.loss_sum.item() == out_clean.loss_sum.item()


# ---------------------------------------------------------------- lambda 0 and no samples are SFT

def batch_without_samples(logps, mask, batch):
    """The dataset sequence alone, as a plain SFT batch."""
    return logps[:1], mask[:1], {"sequence_ids": batch["sequence_ids"][:1], "num_sequences": 1}


@pytest.mark.parametrize("sft_norm", SFT_NORMS)
def test_lambda_zero_is_sft_exactly(sft_norm):
    logps, mask, batch = reply_and_samples()
    out, grad = run(sft_length_loss, logps, mask, batch, length_coef=0.0, sft_norm=sft_norm)
    sft_out, sft_grad = run(sft_loss, *batch_without_samples(logps, mask, batch), sft_norm=sft_norm)
    assert out.loss_sum.item() == sft_out.loss_sum.item() and out.count == sft_out.count
    assert torch.equal(grad[:1], sft_grad) and (grad[1:] == 0).all()
    assert out.metrics["nll"] == sft_out.metrics["nll"]
    # and a step without samples (a batch with no sample_of) is sft_loss, metrics included
    out, grad = run(sft_length_loss, *batch_without_samples(logps, mask, batch), length_coef=0.1, sft_norm=sft_norm)
    assert out.loss_sum.item() == sft_out.loss_sum.item() and out.count == sft_out.count
    assert out.metrics == sft_out.metrics and torch.equal(grad, sft_grad)


# ---------------------------------------------------------------- exact accumulation

def four_groups(groups: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Dataset sequences `groups` (of 4: reply lengths 2, 4, 3, 5) followed by their 3 samples each (lengths below),
    in the order collate gives them: the micro-batch's replies, then their samples; logps random but fixed per
    (group, sample, token), so any split sees the same numbers."""
    replies = [2, 4, 3, 5]
    samples = [[1, 4, 6], [4, 4, 9], [2, 7, 3], [8, 5, 5]]
    g = torch.Generator().manual_seed(seed)
    values = {(i, j): -3 * torch.rand(12, generator=g) for i in range(4) for j in range(4)}  # j 0 = reply
    seqs = [(i, 0, replies[i]) for i in groups] + [(i, j + 1, samples[i][j]) for i in groups for j in range(3)]
    width = 14
    logps, mask = torch.full((len(seqs), width), GARBAGE), torch.zeros(len(seqs), width)
    ids = torch.full((len(seqs), width), -1)
    for row, (i, j, n) in enumerate(seqs):
        ids[row, :2 + n] = row
        logps[row, 2:2 + n], mask[row, 2:2 + n] = values[(i, j)][:n], 1.0
    batch = {"sequence_ids": ids, "num_sequences": len(seqs),
             "sample_of": torch.tensor([-1] * len(groups) + [k for k in range(len(groups)) for _ in range(3)]),
             "length_target": torch.tensor([0.0] * len(groups) + [float(replies[i]) for i in groups for _ in range(3)])}
    return logps, mask, batch


@pytest.mark.parametrize("sft_norm", SFT_NORMS)
def test_one_micro_batch_equals_two(sft_norm):
    """Groups {0,1,2,3} in one micro-batch, or {0,1} and {2,3}: the same loss, count, metrics and per-token
    gradient (each dataset sequence's own tokens and its samples' tokens compared)."""
    whole_logps, whole_mask, whole_batch = four_groups([0, 1, 2, 3])
    leaf = whole_logps.clone().requires_grad_(True)
    out = sft_length_loss(leaf, whole_mask, whole_batch, length_coef=0.05, sft_norm=sft_norm)
    (out.loss_sum / out.count).backward()

    parts = []
    for groups in ([0, 1], [2, 3]):
        logps, mask, batch = four_groups(groups)
        m_leaf = logps.clone().requires_grad_(True)
        parts.append((m_leaf, sft_length_loss(m_leaf, mask, batch, length_coef=0.05, sft_norm=sft_norm)))
    total = sum(o.count for _, o in parts)
    (sum(o.loss_sum for _, o in parts) / total).backward()

    assert total == out.count
    assert_close(sum(o.loss_sum.item() for _, o in parts) / total, out.loss_sum.item() / out.count, tol=1e-6)
    # whole-batch row order: replies 0..3, then samples of 0..3; the halves: replies a, b, then samples of a, b
    whole_rows = [0, 1, 4, 5, 6, 7, 8, 9, 2, 3, 10, 11, 12, 13, 14, 15]
    halves = torch.cat([m.grad for m, _ in parts])
    assert_close(halves, leaf.grad[whole_rows], tol=1e-7)
    for key, (s, c) in out.metrics.items():
        assert_close(sum(o.metrics[key][0] for _, o in parts), s, rtol=1e-6)
        assert sum(o.metrics[key][1] for _, o in parts) == c


# ---------------------------------------------------------------- train.py: flags, the loop, the command line

def lab_flags(out: Path, *extra: str) -> list[str]:
    return ["--loss", "sft_length", "--model", "lab", "--data", "lab:train", "--out", str(out), "--no-progress",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("extra,flag", [
    (["--temperature", "0.7"], "--temperature"), (["--top-p", "0.9"], "--top-p"), (["--top-k", "5"], "--top-k"),
    (["--pack"], "--pack"), (["--mu", "2"], "--mu"), (["--length-penalty-every", "0"], "--length-penalty-every"),
    (["--length-coef", "-1"], "--length-coef")])
def test_bad_flag_combinations_are_refused_at_parse_time(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(lab_flags(tmp_path / "o", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {flag}:"), err


def test_length_penalty_every_is_refused_for_other_objectives(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--loss", "sft", "--out", str(tmp_path / "o"), "--length-penalty-every", "10"])
    assert "--length-penalty-every: applies only to --loss sft_length" in capsys.readouterr().err


def test_defaults_of_the_objective(tmp_path):
    args = train.parse_args(lab_flags(tmp_path / "o"))
    assert args.length_penalty_every == 1 and args.max_new_tokens == 96
    assert flags.loss_hparams(args) == {"length_coef": 0.001, "sft_norm": "sequence_sum"}  # paper 004's Eq. 2
    sft = train.parse_args(["--loss", "sft", "--out", str(tmp_path / "p")])
    assert flags.loss_hparams(sft) == {"sft_norm": "token"} and sft.max_new_tokens == 512  # sft keeps its token mean
    assert train.parse_args(["--loss", "dpo", "--out", str(tmp_path / "q")]).sft_norm is None


def test_last_reply_is_the_prompt_and_the_last_trained_span():
    from data.datasets import Example
    e = Example([1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 1, 0, 0, 1, 1, 1, 0], index=0)
    assert batches.last_reply(e) == ([1, 2, 3, 4, 5], 3)


def cli(out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-u", "train.py", *lab_flags(out, *extra)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_short_lab_run_logs_the_fields(tmp_path):
    """3 steps of 2 replies x 2 samples of at most 48 tokens, the penalty every 2nd step (steps 1 and 3)."""
    out = tmp_path / "run"
    proc = cli(out, "--max-steps", "3", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "48",
               "--length-penalty-every", "2", "--max-examples", "8", "--report-problems", "0", "--eval-every", "0",
               "--length-coef", "0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done (reached --max-steps): 3 steps" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in (steps[0], steps[2]):  # penalty steps
        assert {"nll", "sample_len", "length_penalty", "over_target", "length_target", "truncated"} <= r.keys()
        assert 1 <= r["sample_len"] <= 48 and 0 <= r["over_target"] <= 1 and r["length_penalty"] >= 0
        # The logged loss is Eq. 4's value per reply (sequence_sum): the replies' summed NLL / 2 + lambda mean c,
        # the replies' tokens being the trained tokens less the 4 samples' tokens.
        reply_tokens = r["trained_tokens"] - 4 * r["sample_len"]
        assert r["loss"] == pytest.approx(r["nll"] * reply_tokens / 2 + r["length_penalty"], rel=1e-5)
    assert "sample_len" not in steps[1]  # no samples on step 2: plain SFT, sequence_sum
    assert steps[1]["loss"] == pytest.approx(steps[1]["nll"] * steps[1]["trained_tokens"] / 2, rel=1e-5)
    assert "sample_len" in proc.stdout and any(r.get("eval") for r in rows)


@pytest.fixture(scope="module")
def tiny_stopper(tmp_path_factory) -> Path:
    """A tiny random Qwen2 on the lab's tokenizer whose config lists 1 token in 8 as eos (besides <|im_end|>), so its
    samples stop after ~8 tokens at random: their lengths vary around the 2-3-token replies of `short_replies`."""
    return write_tiny_lab_model(tmp_path_factory.mktemp("tiny_stopper"), [LAB_IM_END, *range(100, 768, 8)])


@pytest.fixture(scope="module")
def short_replies(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "short.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (40, 2), (6, 1), (8, 8)]))
    return path


def test_one_micro_batch_of_8_equals_4_of_2(tmp_path, tiny_stopper, short_replies):
    """One step of 8 replies x 4 samples (at most 16 tokens) as 1 micro-batch of 8 or 4 of 2: the same samples (one
    generate() per step), loss, metrics and update. The samples' lengths vary and exceed the replies', so the
    penalty's gradient is not 0 (checked: the update differs from lambda 0's)."""
    def run_once(out, *extra):
        train.train(train.parse_args(
            ["--loss", "sft_length", "--model", str(tiny_stopper), "--data", str(short_replies), "--out", str(out),
             "--no-progress", "--device", "cpu", "--max-steps", "1", "--num-generations", "4", "--max-new-tokens",
             "16", "--lr", "1e-3", "--warmup-steps", "0", "--length-coef", "0.01", *extra]))
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    one = run_once(tmp_path / "one", "--batch-size", "8", "--grad-accum", "1")
    four = run_once(tmp_path / "four", "--batch-size", "2", "--grad-accum", "4")
    no_penalty = run_once(tmp_path / "zero", "--batch-size", "8", "--length-coef", "0")
    assert one["length_penalty"] > 0 and 0 < one["over_target"] < 1 and one["truncated"] < 1
    for key in ("loss", "grad_norm", "nll", "sample_len", "length_penalty", "over_target", "trained_tokens"):
        assert one[key] == pytest.approx(four[key], rel=1e-5), key
    assert no_penalty["sample_len"] == one["sample_len"] and no_penalty["grad_norm"] != pytest.approx(one["grad_norm"])
    from model import load_model
    wa, wb, w0 = (load_model(str(d), torch.float32, "cpu")[0].state_dict()
                  for d in (tmp_path / "one" / "final", tmp_path / "four" / "final", tiny_stopper))
    moved = sum(float((wa[k] - w0[k]).pow(2).sum()) for k in wa) ** 0.5
    apart = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa) ** 0.5
    assert moved > 0.01 and apart < 1e-2 * moved, (apart, moved)  # see test_grpo_train: Adam amplifies rounding noise
