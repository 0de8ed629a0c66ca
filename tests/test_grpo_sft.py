"""GRPO + SFT on demonstrations (--loss grpo --sft-data, losses/grpo_sft.py), checked against the equation by hand.

Each optimizer step's objective is L = L_GRPO + lambda L_SFT with L_GRPO = sum(grpo loss_sum) / C and L_SFT =
sum(demonstration NLL) / N. The loop divides the step's summed loss_sum by its summed count once; a demonstration
micro-batch reports count 0 and loss_sum = lambda (C / N) sum NLL, so

    (sum_rollouts loss_sum + sum_demos lambda (C / N) NLL) / (sum_rollouts count) = L_GRPO + lambda L_SFT

whenever sum_rollouts count == C, which the batch source computes with grpo_count, grpo_loss's own rule. The unit
tests below apply the loop's rule (`step_objective`) to micro-batches made by hand from a tiny random Qwen2.
"""

from __future__ import annotations

import json

import pytest
import torch

import train
from data.collate import collate
from data.datasets import Example
from losses.grpo import grpo_count, grpo_loss
from losses.grpo_sft import grpo_sft_loss
from losses.logprobs import sequence_logprobs
from losses.sft import sft_loss
from model import load_model
from tests.conftest import DIGITS_REWARD
from tests.test_grpo_train import flags, rows_of

LOSS_AGGS = ("token", "sequence", "constant")


def completions(seed: int, n: int, prompt_len: int = 4) -> list[Example]:
    """n sequences of random ids: a prompt of `prompt_len` untrained tokens, then 3-7 trained ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 8, (1,), generator=g))
        ids = torch.randint(10, 700, (prompt_len + length,), generator=g).tolist()
        out.append(Example(ids, [0] * prompt_len + [1] * length, index=i))
    return out


def rollout_batch(examples: list[Example], advantages: list[float], keep: list[float] | None = None) -> dict:
    batch = collate(examples, 0)
    batch["advantages"] = torch.tensor(advantages)  # (N,)
    if keep is not None:
        batch["keep"] = torch.tensor(keep)  # (N,)
    return batch


def demonstration_batches(demos: list[Example], sizes: list[int], rl_count: float) -> list[dict]:
    """`demos` split into micro-batches of `sizes`, each carrying the step's C and N (as RolloutBatches does)."""
    batches, first = [], 0
    for size in sizes:
        batches.append(collate(demos[first:first + size], 0))
        first += size
    n_tokens = sum(float(b["loss_mask"].sum()) for b in batches)
    for b in batches:
        b.update(demonstration=True, rl_count=max(rl_count, 1.0), sft_tokens=n_tokens)
    return batches


def step_objective(model, batches: list[dict], loss_fn, **hparams) -> tuple[float, float, list[torch.Tensor]]:
    """train.py's rule on one step: backward of the summed loss_sum / the summed count; (loss, count, grads)."""
    model.zero_grad()
    parts = [loss_fn(sequence_logprobs(model, b, 64).float(), b["loss_mask"], b, **hparams) for b in batches]
    count = sum(p.count for p in parts)
    loss = sum(p.loss_sum for p in parts) / max(count, 1.0)
    loss.backward()
    return loss.item(), count, [p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def digits_reward(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(DIGITS_REWARD)
    return f"{path}:digits"


@pytest.fixture(scope="module")
def model(tiny_lab_model):
    m, _ = load_model(str(tiny_lab_model), torch.float32, "cpu")
    return m


@pytest.fixture(scope="module")
def rollouts() -> list[dict]:
    """Two rollout micro-batches with nonzero advantages, one completion left out (keep 0)."""
    return [rollout_batch(completions(1, 3), [1.0, -0.5, 0.25], keep=[1.0, 0.0, 1.0]),
            rollout_batch(completions(2, 2), [-1.0, 0.75])]


def rl_count(rollouts: list[dict], loss_agg: str) -> float:
    return sum(float(grpo_count(b["loss_mask"], b, loss_agg)) for b in rollouts)


def close(a: list[torch.Tensor], b: list[torch.Tensor], rel: float = 1e-5) -> bool:
    scale = max(float(x.abs().max()) for x in b)
    return all(torch.allclose(x, y, rtol=0, atol=rel * scale) for x, y in zip(a, b))


def test_grpo_count_is_grpo_losss_count(model, rollouts):
    for agg in LOSS_AGGS:
        for b in rollouts:
            out = grpo_loss(sequence_logprobs(model, b, 64).float(), b["loss_mask"], b, loss_agg=agg)
            assert out.count == float(grpo_count(b["loss_mask"], b, agg))
    # by hand: batch 0 keeps completions 0 and 2 (their trained tokens), batch 1 both
    tokens = [int(b["loss_mask"][b["sequence_ids"] == s].sum()) for b in rollouts for s in range(b["num_sequences"])]
    assert rl_count(rollouts, "token") == tokens[0] + tokens[2] + tokens[3] + tokens[4]
    assert rl_count(rollouts, "sequence") == rl_count(rollouts, "constant") == 4.0


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_coef_zero_is_grpo_exactly(model, rollouts, agg):
    """lambda = 0: every demonstration loss_sum is 0 * (...) with count 0, so the step's loss and gradient are
    GRPO's alone, bit for bit."""
    demos = demonstration_batches(completions(3, 4), [4], rl_count(rollouts, agg))
    hybrid = step_objective(model, rollouts + demos, grpo_sft_loss, sft_coef=0.0, loss_agg=agg, agg_constant=12.0)
    plain = step_objective(model, rollouts, grpo_loss, loss_agg=agg, agg_constant=12.0)
    assert hybrid[0] == plain[0] and hybrid[1] == plain[1]
    assert all(torch.equal(a, b) for a, b in zip(hybrid[2], plain[2]))
    assert max(float(g.abs().max()) for g in plain[2]) > 0  # GRPO's gradient is not trivially zero


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_zero_advantages_give_lambda_times_sfts_gradient(model, agg):
    """All advantages 0 and beta 0: every GRPO token loss is -min(w 0, clip(w) 0) = 0, so the step is
    (0 + lambda (C / N) sum NLL) / C = lambda sum NLL / N, i.e. lambda times sft's token-mean loss, and its
    gradient lambda times sft's gradient on the same demonstrations."""
    rollouts = [rollout_batch(completions(4, 3), [0.0, 0.0, 0.0])]
    demo_examples = completions(5, 4)
    coef = 0.3
    hybrid = step_objective(model, rollouts + demonstration_batches(demo_examples, [4], rl_count(rollouts, agg)),
                            grpo_sft_loss, sft_coef=coef, loss_agg=agg, agg_constant=12.0)
    sft = step_objective(model, [collate(demo_examples, 0)], sft_loss, sft_norm="token")
    assert hybrid[0] == pytest.approx(coef * sft[0], rel=1e-6)
    assert close(hybrid[2], [coef * g for g in sft[2]])
    assert max(float(g.abs().max()) for g in sft[2]) > 0


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_exact_under_accumulation_of_demonstrations(model, rollouts, agg):
    """The same 4 demonstrations as 1 micro-batch of 4 or 2 of 2 (N, the step's demonstration tokens, the same
    constant): the same summed objective and gradient, and it is L_GRPO + lambda L_SFT computed directly."""
    demos, coef, c = completions(6, 4), 0.5, rl_count(rollouts, agg)
    one = step_objective(model, rollouts + demonstration_batches(demos, [4], c), grpo_sft_loss, sft_coef=coef,
                         loss_agg=agg, agg_constant=12.0)
    two = step_objective(model, rollouts + demonstration_batches(demos, [2, 2], c), grpo_sft_loss, sft_coef=coef,
                         loss_agg=agg, agg_constant=12.0)
    assert one[0] == pytest.approx(two[0], rel=1e-6) and one[1] == two[1] == c
    assert close(one[2], two[2])
    rl = step_objective(model, rollouts, grpo_loss, loss_agg=agg, agg_constant=12.0)[0]
    sft = step_objective(model, [collate(demos, 0)], sft_loss, sft_norm="token")[0]
    assert one[0] == pytest.approx(rl + coef * sft, rel=1e-6)


def test_no_grpo_unit_leaves_lambda_sft(model):
    """Every completion left out (C = 0): the loop divides by max(0, 1) = 1, and so does the source's C / N."""
    rollouts = [rollout_batch(completions(7, 2), [1.0, -1.0], keep=[0.0, 0.0])]
    demos = completions(8, 2)
    hybrid = step_objective(model, rollouts + demonstration_batches(demos, [2], rl_count(rollouts, "token")),
                            grpo_sft_loss, sft_coef=0.5)
    sft = step_objective(model, [collate(demos, 0)], sft_loss, sft_norm="token")
    assert hybrid[1] == 0.0 and hybrid[0] == pytest.approx(0.5 * sft[0], rel=1e-6)


# ---------------------------------------------------------------- from the command line

def hybrid_flags(model_dir, out, *extra: str) -> list[str]:
    return flags(model_dir, out, "--sft-data", "lab", "--sft-coef", "0.5", "--batch-size", "2", *extra)


def test_a_tiny_lab_run_logs_both_terms_and_resumes_the_demonstration_cursor(tiny_lab_model, tmp_path,
                                                                            digits_reward):
    """Two steps: each row's loss is rl_loss + 0.5 sft_nll (so the source's C is the loop's count), the checkpoint
    after step 1 holds the cursor (2 demonstrations drawn), and resuming from it (the resume truncates
    metrics.jsonl to step 1) gives step 2 again: the same demonstrations, the same numbers."""
    common = ["--max-steps", "2", "--reward", digits_reward]
    full = tmp_path / "full"
    train.main(hybrid_flags(tiny_lab_model, full, *common, "--save-every", "1"))
    rows = rows_of(full)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] == pytest.approx(r["rl_loss"] + 0.5 * r["sft_nll"], rel=1e-5, abs=1e-7)
        assert r["sft_nll"] > 1.0 and r["grad_norm"] > 0
    assert torch.load(full / "step_1" / "training_state.pt", weights_only=False)["demonstrations"] == 2
    assert json.loads((full / "args.json").read_text())["sft_coef"] == 0.5

    train.main(hybrid_flags(tiny_lab_model, full, *common, "--resume", str(full / "step_1")))  # step 2 again
    resumed = rows_of(full)
    assert [r["step"] for r in resumed] == [1, 2]
    for key in ("loss", "sft_nll", "rl_loss", "grad_norm"):
        assert resumed[1][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-7), key
    assert rows[0]["sft_nll"] != pytest.approx(rows[1]["sft_nll"], rel=1e-4)  # step 2 drew other demonstrations


def test_a_run_is_exact_under_accumulation(tiny_lab_model, tmp_path, digits_reward):
    """One step of 2 prompts and 2 demonstrations: --batch-size 2 --grad-accum 1 == --batch-size 1 --grad-accum 2
    (the prompts' samples are seeded per prompt, the demonstrations are the same two)."""
    common = ["--max-steps", "1", "--reward", digits_reward, "--loss-agg", "sequence"]
    train.main(hybrid_flags(tiny_lab_model, tmp_path / "one", *common))
    train.main(hybrid_flags(tiny_lab_model, tmp_path / "two", *common, "--batch-size", "1", "--grad-accum", "2"))
    one, two = rows_of(tmp_path / "one")[0], rows_of(tmp_path / "two")[0]
    for key in ("loss", "sft_nll", "rl_loss", "grad_norm"):
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), key


