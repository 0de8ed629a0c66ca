"""DPO family (losses/dpo.py, losses/minor_dpo.py): values and gradients derived by hand, and the prompt-included form.

The hand-worked batch (`pairs_batch`) holds 2 pairs as 4 sequences, one per row, in collate_pairs' order (chosen
of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1). Chosen replies have m_w = 2 trained tokens,
rejected m_l = 3; position 0 is a prompt token (mask 0, finite garbage). The policy's per-token log-probs are
arbitrary; the reference's are set so that the sequence log-ratios r = log pi_theta(y|x) - log pi_ref(y|x) are
exactly the numbers asked for. With beta = 1/2 and c = ln 3 the default numbers are

    pair 0: r_w = +c, r_l = -c  ->  h = 2c,  beta h = +ln 3,  sigmoid(beta h) = 3/4
    pair 1: r_w = -c, r_l = +c  ->  h = -2c, beta h = -ln 3,  sigmoid(beta h) = 1/4

so every variant's value and derivative dL/dh is a short expression in ln 3 and quarters (each test's docstring
works it out). Since log pi(y|x) is the SUM of the reply's token log-probs, d loss / d logps is dL/dh on every
chosen token and -dL/dh on every rejected token of the pair (IPO, on mean log-probs: dL/dh / m_w and -dL/dh / m_l),
and exactly 0 under mask 0.
"""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from data.datasets import Example
from data.preference import PreferencePair, collate_pairs
from losses import LOSSES, NEEDS_REFERENCE, ON_SCORES, PREFERENCE_LOSSES, hparams_for
from losses.dpo import dpo_loss
from losses.logprobs import sequence_logprobs
from losses.minor_dpo import minor_dpo_loss
from model import load_model

C = math.log(3.0)
BETA = 0.5
GARBAGE = 123.0
M_W, M_L = 2, 3


def pairs_batch(ratios: tuple[tuple[float, float], ...] = ((C, -C), (-C, C))) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logps, mask, batch) for pairs with the given (r_w, r_l); see the module docstring."""
    n = len(ratios)
    logps = torch.tensor([[GARBAGE, -0.5, -1.5, -0.25]] * n + [[GARBAGE, -0.7, -0.2, -2.0]] * n)  # (2n, 4)
    mask = torch.tensor([[0.0, 1, 1, 0]] * n + [[0.0, 1, 1, 1]] * n)
    shift = torch.zeros(2 * n, 4)
    for k, (r_w, r_l) in enumerate(ratios):
        shift[k, 1:3] = r_w / M_W
        shift[n + k, 1:4] = r_l / M_L
    ref_logps = torch.where(mask > 0, logps - shift, 0.0)
    sequence_ids = torch.arange(2 * n)[:, None].expand(2 * n, 4).clone()
    batch = {"sequence_ids": sequence_ids, "num_sequences": 2 * n, "ref_logps": ref_logps,
             "chosen_seq": torch.arange(n), "rejected_seq": torch.arange(n, 2 * n)}
    return logps, mask, batch


def run(fn, logps, mask, batch, **hparams):
    leaf = logps.clone().requires_grad_(True)
    out = fn(leaf, mask, batch, **hparams)
    out.loss_sum.backward()
    return out, leaf.grad


def expected_grad(dl_dh: list[float], mask: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """dL/dh on each chosen token, -dL/dh on each rejected token (divided by m for length-normalised h)."""
    n = len(dl_dh)
    g = torch.zeros_like(mask)
    for k, d in enumerate(dl_dh):
        g[k] = d / (M_W if normalized else 1) * mask[k]
        g[n + k] = -d / (M_L if normalized else 1) * mask[n + k]
    return g


def check(out, grad, mask, values: list[float], dl_dh: list[float], normalized: bool = False) -> None:
    assert out.count == len(values)
    torch.testing.assert_close(out.loss_sum.double(), torch.tensor(sum(values), dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad(dl_dh, mask, normalized), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- registry


def test_registry_and_hparams():
    assert {"dpo", "minor_dpo"} <= PREFERENCE_LOSSES
    assert PREFERENCE_LOSSES - ON_SCORES <= NEEDS_REFERENCE  # every pair objective on log-probs has a reference
    flags = {"beta": 0.2, "dpo_variant": "ipo", "label_smoothing": 0.1, "sft_norm": "token"}
    assert hparams_for("dpo", flags) == {"beta": 0.2, "dpo_variant": "ipo", "label_smoothing": 0.1}
    assert hparams_for("minor_dpo", flags) == {"beta": 0.2}
    assert LOSSES["dpo"] is dpo_loss and LOSSES["minor_dpo"] is minor_dpo_loss


# ---------------------------------------------------------------- policy == reference


@pytest.mark.parametrize("fn", [dpo_loss, minor_dpo_loss], ids=["dpo", "minor_dpo"])
def test_policy_equals_reference_gives_log2_and_half_beta_gradients(fn):
    """r_w = r_l = 0: h = 0, loss = -log sigmoid(0) = log 2 per pair; dL/dh = -beta sigmoid(0) = -beta/2, so every
    chosen token gets -beta/2 and every rejected token +beta/2 (beta = 1/2: -1/4 and +1/4). minor_dpo at r_l = 0 is
    the same: the clamp passes the gradient at its boundary."""
    logps, mask, batch = pairs_batch(((0.0, 0.0), (0.0, 0.0)))
    out, grad = run(fn, logps, mask, batch, beta=BETA)
    check(out, grad, mask, [math.log(2)] * 2, [-BETA / 2] * 2)
    m = out.metrics
    assert m["reward_chosen"][0] == pytest.approx(0, abs=1e-6) and m["margin"][0] == pytest.approx(0, abs=1e-6)
    assert m["reward_accuracy"] == (0.0, 2.0)  # margin 0 is not > 0


def test_default_beta_is_a_tenth():
    """Paper 004 and the DPO paper's default: at h = 0 the token gradients are -0.05 / +0.05."""
    logps, mask, batch = pairs_batch(((0.0, 0.0),))
    out, grad = run(dpo_loss, logps, mask, batch)
    check(out, grad, mask, [math.log(2)], [-0.05])


# ---------------------------------------------------------------- every variant on fixed numbers


def test_sigmoid():
    """pair 0: -log(3/4) = ln(4/3), dL/dh = -beta (1 - 3/4) = -1/8; pair 1: -log(1/4) = ln 4, dL/dh = -beta 3/4."""
    out, grad = run(dpo_loss, *pairs_batch(), beta=BETA)
    check(out, grad, pairs_batch()[1], [math.log(4 / 3), math.log(4)], [-1 / 8, -3 / 8])


def test_hinge():
    """max(0, 1 - beta h): pair 0 1 - ln 3 < 0 -> 0, no gradient; pair 1: 1 + ln 3, dL/dh = -beta = -1/2."""
    out, grad = run(dpo_loss, *pairs_batch(), beta=BETA, dpo_variant="hinge")
    check(out, grad, pairs_batch()[1], [0.0, 1 + C], [0.0, -0.5])


def test_ipo_uses_length_normalised_log_ratios():
    """h = r_w/2 - r_l/3: pair 0 h = c/2 + c/3 = 5c/6, pair 1 h = -5c/6; target 1/(2 beta) = 1.
    loss (h - 1)^2, dL/dh = 2 (h - 1), spread as dL/dh / 2 per chosen token and -dL/dh / 3 per rejected token."""
    h = [5 * C / 6, -5 * C / 6]
    out, grad = run(dpo_loss, *pairs_batch(), beta=BETA, dpo_variant="ipo")
    check(out, grad, pairs_batch()[1], [(x - 1) ** 2 for x in h], [2 * (x - 1) for x in h], normalized=True)


def test_cdpo_label_smoothing():
    """eps = 1/4: loss = -(3/4) log s(beta h) - (1/4) log s(-beta h), dL/dh = beta [-(3/4) s(-beta h) + (1/4) s(beta h)].
    pair 0 (s = 3/4): -(3/4) ln(3/4) - (1/4) ln(1/4), dL/dh = beta (-3/16 + 3/16) = 0 (cDPO's optimum is
    s(beta h) = 1 - eps); pair 1 (s = 1/4): -(3/4) ln(1/4) - (1/4) ln(3/4), dL/dh = beta (-9/16 + 1/16) = -1/4."""
    out, grad = run(dpo_loss, *pairs_batch(), beta=BETA, dpo_variant="cdpo", label_smoothing=0.25)
    values = [-0.75 * math.log(0.75) - 0.25 * math.log(0.25), -0.75 * math.log(0.25) - 0.25 * math.log(0.75)]
    check(out, grad, pairs_batch()[1], values, [0.0, -0.25])


def test_robust():
    """eps = 1/4, 1/(1 - 2 eps) = 2: loss = 2 [-(3/4) log s(beta h) + (1/4) log s(-beta h)],
    dL/dh = 2 beta [-(3/4) s(-beta h) - (1/4) s(beta h)]. pair 0: 2 [-(3/4) ln(3/4) + (1/4) ln(1/4)],
    dL/dh = 2 beta (-3/16 - 3/16) = -3/8; pair 1: 2 [-(3/4) ln(1/4) + (1/4) ln(3/4)], dL/dh = 2 beta (-9/16 - 1/16)
    = -5/8."""
    out, grad = run(dpo_loss, *pairs_batch(), beta=BETA, dpo_variant="robust", label_smoothing=0.25)
    values = [2 * (-0.75 * math.log(0.75) + 0.25 * math.log(0.25)), 2 * (-0.75 * math.log(0.25) + 0.25 * math.log(0.75))]
    check(out, grad, pairs_batch()[1], values, [-3 / 8, -5 / 8])


def test_cdpo_and_robust_without_smoothing_are_dpo():
    ref, ref_grad = run(dpo_loss, *pairs_batch(), beta=BETA)
    for variant in ("cdpo", "robust"):
        out, grad = run(dpo_loss, *pairs_batch(), beta=BETA, dpo_variant=variant, label_smoothing=0.0)
        torch.testing.assert_close(out.loss_sum, ref.loss_sum)
        torch.testing.assert_close(grad, ref_grad)


def test_metrics_on_fixed_numbers():
    """rewards beta r: chosen (c/2, -c/2) mean 0, rejected (-c/2, c/2) mean 0; margins (c, -c): mean 0, accuracy
    1/2. logp_chosen = -0.5 - 1.5 = -2 per chosen reply, logp_rejected = -0.7 - 0.2 - 2 = -2.9; nll = 2 / 2 = 1."""
    out, _ = run(dpo_loss, *pairs_batch(), beta=BETA)
    m = {k: s / c for k, (s, c) in out.metrics.items()}
    assert m["reward_chosen"] == pytest.approx(0, abs=1e-6) and m["reward_rejected"] == pytest.approx(0, abs=1e-6)
    assert m["margin"] == pytest.approx(0, abs=1e-6) and m["reward_accuracy"] == 0.5
    assert m["logp_chosen"] == pytest.approx(-2.0) and m["logp_rejected"] == pytest.approx(-2.9)
    assert m["nll"] == pytest.approx(1.0)
    one, _ = run(dpo_loss, *pairs_batch(((C, -C),)), beta=BETA)
    assert one.metrics["reward_chosen"][0] == pytest.approx(C / 2) and one.metrics["margin"][0] == pytest.approx(C)


# ---------------------------------------------------------------- minor_dpo


def test_minor_dpo_equals_dpo_while_rejected_ratio_is_non_negative():
    """r_l = +c and r_l = 0 (>= 0): max(0, r_l) = r_l, the same value and gradient as dpo."""
    for ratios in (((-C, C), (0.5, 0.0)),):
        ref, ref_grad = run(dpo_loss, *pairs_batch(ratios), beta=BETA)
        out, grad = run(minor_dpo_loss, *pairs_batch(ratios), beta=BETA)
        torch.testing.assert_close(out.loss_sum, ref.loss_sum)
        torch.testing.assert_close(grad, ref_grad)
        assert out.metrics["rejected_active"] == (2.0, 2.0)


def test_minor_dpo_stops_pushing_a_rejected_answer_below_the_reference():
    """pair 0 of the default batch has r_l = -c < 0: loss = -log sigmoid(beta r_w) = -log sigmoid(ln 3 / 2)
    = log(1 + 3^(-1/2)), dL/dr_w = -beta sigmoid(-ln 3 / 2) = -beta / (1 + sqrt 3), and exactly 0 on its rejected
    tokens; pair 1 (r_l = +c) is dpo's: ln 4, -3/8."""
    logps, mask, batch = pairs_batch()
    out, grad = run(minor_dpo_loss, logps, mask, batch, beta=BETA)
    expected = math.log(1 + 3 ** -0.5) + math.log(4)
    assert float(out.loss_sum.detach()) == pytest.approx(expected, abs=1e-6)
    assert torch.all(grad[2] == 0.0), "a rejected reply below the reference must get no gradient"
    torch.testing.assert_close(grad[0], torch.tensor([0.0, 1, 1, 0]) * (-BETA / (1 + math.sqrt(3))))
    torch.testing.assert_close(grad[1], torch.tensor([0.0, 1, 1, 0]) * (-3 / 8))
    torch.testing.assert_close(grad[3], torch.tensor([0.0, 1, 1, 1]) * (3 / 8))
    assert out.metrics["rejected_active"] == (1.0, 2.0)


# ---------------------------------------------------------------- paper 000's prompt-included form


def pair_examples(prompt: list[int], chosen: list[int], rejected: list[int], span: str, index: int = 0,
                  rejected_prompt: list[int] | None = None) -> PreferencePair:
    """A pair built from token ids; span "response": mask 1 on the reply; "sequence": on every token but the first."""
    examples = []
    for k, (p, reply) in enumerate(((prompt, chosen), (rejected_prompt or prompt, rejected))):
        ids = p + reply
        mask = [0] * len(p) + [1] * len(reply) if span == "response" else [0] + [1] * (len(ids) - 1)
        examples.append(Example(ids, mask, 2 * index + k))
    return PreferencePair(examples[0], examples[1], index, len(prompt))


def dpo_on_model(model, ref, pairs, beta: float = 0.5) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss of `pairs` under policy `model` and reference `ref`, and the policy's parameter gradients."""
    model.zero_grad(set_to_none=True)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        batch["ref_logps"] = sequence_logprobs(ref, batch)
    out = dpo_loss(sequence_logprobs(model, batch), batch["loss_mask"], batch, beta=beta)
    out.loss_sum.backward()
    return float(out.loss_sum), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_prompt_included_form_equals_response_only_when_prompts_are_identical(tiny_qwen2_untied, tiny_qwen2_tied):
    """Paper 000's Eq. 3 sums log-probs over the whole sequence. With the same prompt tokens in both sequences, the
    prompt's log-probs are the same in both (a causal model sees the same prefix), under the policy and under the
    reference, so they cancel in h: loss and parameter gradients equal the response-only form (two different random
    models as policy and reference, so h != 0). With differently cut prompts (the rejected one loses its first 3
    tokens, as independent per-sequence truncation would do) they do not cancel and the loss differs."""
    policy, _ = load_model(str(tiny_qwen2_untied), torch.float32, "cpu")
    ref, _ = load_model(str(tiny_qwen2_tied), torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, 384, (n,), generator=g).tolist()  # noqa: E731
    raw = [(ids(9), ids(5), ids(7)), (ids(6), ids(8), ids(3))]
    response = [pair_examples(*r, "response", index=i) for i, r in enumerate(raw)]
    sequence = [pair_examples(*r, "sequence", index=i) for i, r in enumerate(raw)]
    loss_r, grads_r = dpo_on_model(policy, ref, response)
    loss_s, grads_s = dpo_on_model(policy, ref, sequence)
    assert abs(loss_r - 2 * math.log(2)) > 1e-3, "policy and reference must differ for this test to mean anything"
    assert loss_s == pytest.approx(loss_r, abs=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_s[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)

    cut = [pair_examples(p, c, r, "sequence", index=i, rejected_prompt=p[3:]) for i, (p, c, r) in enumerate(raw)]
    loss_cut, _ = dpo_on_model(policy, ref, cut)
    assert abs(loss_cut - loss_r) > 1e-3


# ---------------------------------------------------------------- train.py with preference pairs

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import train  # noqa: E402
from tests.conftest import REPO_ROOT, SHARED, requires_shared  # noqa: E402
from tests.test_train import assert_rows_match, assert_same_weights, base_flags, model_dir, read_rows  # noqa: E402,F401

ULTRAFEEDBACK = SHARED / "data" / "ultrafeedback" / "messages_500.jsonl"
PAIR_KEYS = ("loss", "grad_norm", "nll", "reward_chosen", "reward_rejected", "margin", "reward_accuracy",
             "logp_chosen", "logp_rejected", "trained_tokens")


@pytest.fixture(scope="module")
def uf_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uf8.jsonl: the 8 shared UltraFeedback rows with the shortest replies, ties left out (cut to --max-len 64)."""
    if not ULTRAFEEDBACK.is_file():
        pytest.skip(f"{ULTRAFEEDBACK} not found")
    rows = [json.loads(line) for line in ULTRAFEEDBACK.read_text().splitlines()]
    rows = [r for r in rows if r["score_chosen"] != r["score_rejected"]]
    rows.sort(key=lambda r: len(r["chosen"][-1]["content"]) + len(r["rejected"][-1]["content"]))
    path = tmp_path_factory.mktemp("uf") / "uf8.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(cache))
    return cache


def run_dpo(model_dir: Path, data: Path, out: Path, *flags: str) -> list[dict]:
    train.train(train.parse_args([*base_flags(model_dir, data, out), "--max-len", "64", "--loss", "dpo", *flags]))
    return read_rows(out)


@requires_shared
def test_dpo_from_the_command_line_learns_the_training_pairs_and_saves_a_loadable_checkpoint(
        model_dir: Path, uf_rows: Path, tmp_path: Path):
    """dpo and minor_dpo, 10 steps over the same 4 pairs at lr 1e-2: step 1 is at pi == pi_ref (loss log 2, margin 0);
    the loss falls and the implicit-reward accuracy on those pairs reaches 1. The final checkpoint loads in the
    reference implementation and gives our logits."""
    procs = {}
    for loss in ("dpo", "minor_dpo"):
        out = tmp_path / loss
        args = [*base_flags(model_dir, uf_rows, out), "--max-len", "64", "--loss", loss, "--max-steps", "10",
                "--lr", "1e-2", "--schedule", "constant", "--max-examples", "4"]
        procs[loss] = (out, subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO_ROOT, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for loss, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        assert "done (reached --max-steps): 10 steps" in stdout
        rows = read_rows(out)
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["margin"] == pytest.approx(0, abs=1e-6)
        assert rows[-1]["loss"] < 0.75 * math.log(2), f"{loss}: loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}"
        assert [r["reward_accuracy"] for r in rows[-3:]] == [1.0, 1.0, 1.0]
        assert json.loads((out / "final" / "args.json").read_text())["loss"] == loss

    from transformers import Qwen2ForCausalLM

    from model import load_model
    final = tmp_path / "dpo" / "final"
    reference = Qwen2ForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours, _ = load_model(str(final), torch.float32, "cpu")
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-5)
    changed = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).model.embed_tokens.weight
    assert not torch.equal(changed, reference.model.embed_tokens.weight), "no training happened"


@requires_shared
def test_precomputed_reference_equals_live_reference(model_dir: Path, uf_rows: Path, tmp_path: Path,
                                                     private_cache: Path):
    flags = ("--max-steps", "2", "--batch-size", "4")
    cached = run_dpo(model_dir, uf_rows, tmp_path / "cached", *flags)
    assert len(list(private_cache.glob("ref_logps/*.pt"))) == 1
    live = run_dpo(model_dir, uf_rows, tmp_path / "live", *flags, "--ref-mode", "live")
    assert_rows_match(live, cached, PAIR_KEYS, rtol=1e-5)
    assert cached[1]["margin"] != 0.0, "step 2 must have moved away from the reference"


@requires_shared
def test_one_micro_batch_of_8_pairs_equals_4_of_2(model_dir: Path, uf_rows: Path, tmp_path: Path):
    """Exact accumulation with the pair as the unit (lr 1e-4 and tolerances as in test_train's accumulation test).
    minor_dpo shares every line of this path but its loss function."""
    extra = ["--max-steps", "2", "--lr", "1e-4"]
    whole = run_dpo(model_dir, uf_rows, tmp_path / "whole", *extra, "--batch-size", "8", "--grad-accum", "1")
    split = run_dpo(model_dir, uf_rows, tmp_path / "split", *extra, "--batch-size", "2", "--grad-accum", "4")
    assert_rows_match(split, whole, PAIR_KEYS, rtol=1e-6)
    # Weights within 5e-6 after 2 steps of lr 1e-4: fp32 sums in another order, amplified by Adam where the second
    # moment is tiny (rarely seen embedding rows); 1.4e-6 was seen with 2 threads.
    assert_same_weights(tmp_path / "split" / "final", tmp_path / "whole" / "final", atol=5e-6)


@requires_shared
def test_packed_equals_padded(model_dir: Path, uf_rows: Path, tmp_path: Path):
    """--pack puts each micro-batch's 16 sequences (8 pairs) into rows of --max-len tokens instead of 16 padded
    rows: the same pairs, the same step."""
    extra = ["--max-steps", "2", "--lr", "1e-4", "--batch-size", "8"]
    packed = run_dpo(model_dir, uf_rows, tmp_path / "packed", *extra, "--pack")
    padded = run_dpo(model_dir, uf_rows, tmp_path / "padded", *extra)
    assert packed[0]["tokens"] == padded[0]["tokens"]  # real tokens, padding excluded: the same sequences
    assert_rows_match(packed, padded, PAIR_KEYS, rtol=1e-5)
    assert_same_weights(tmp_path / "packed" / "final", tmp_path / "padded" / "final", atol=1e-6)


# ---------------------------------------------------------------- eval.py --metric preference / responses

import eval as evaluation  # noqa: E402
from data.datasets import load_rows  # noqa: E402
from data.lab import LAB_BASE_DIR  # noqa: E402
from data.preference import tokenize_preference_rows  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402


def test_eval_preference_matches_a_naive_computation(tmp_path: Path):
    """Eq. 4 accuracy recomputed without the kernel or collate_pairs: one unpadded forward per sequence, full
    log_softmax, response tokens picked by the loss mask. With --ref-model equal to --model every margin is exactly
    0, which is not a win: reward accuracy 0. The lab base prefers the correct solution of every lab pair, so every
    third pair is written with chosen and rejected swapped, and both outcomes occur."""
    rows = load_rows("lab:test:preference")[:12]
    for row in rows[::3]:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "pref.json"
    payload = evaluation.run(evaluation.parse_args(["--metric", "preference", "--model", "lab", "--ref-model", "lab",
                                                    "--data", str(data), "--out", str(out)]))
    assert payload["data"] == str(data) and json.loads(out.read_text())["results"]
    result = payload["results"]["lab"]
    model, _ = load_model(str(LAB_BASE_DIR), torch.float32, "cpu")
    pairs, _ = tokenize_preference_rows(rows, load_tokenizer(LAB_BASE_DIR), 1024)

    def naive(example):
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
        mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
        return float(logp[mask].sum()), int(mask.sum())

    sums = [(naive(p.chosen), naive(p.rejected)) for p in pairs]
    wins = [lc > lr for (lc, _), (lr, _) in sums]
    wins_norm = [lc / mc > lr / mr for (lc, mc), (lr, mr) in sums]
    assert 0 < sum(wins) < len(wins), "the test needs both outcomes among its pairs"
    assert result["pairs"] == 12
    assert result["accuracy"] == pytest.approx(np.mean(wins))
    assert result["accuracy_length_normalized"] == pytest.approx(np.mean(wins_norm))
    assert result["logp_chosen"] == pytest.approx(np.mean([lc for (lc, _), _ in sums]), rel=1e-5)
    assert result["reward_accuracy"] == 0.0


def test_eval_responses_side_by_side_markdown(tmp_path: Path):
    out = tmp_path / "resp.json"
    payload = evaluation.run(evaluation.parse_args(["--metric", "responses", "--model", "lab", "--model",
                                                    str(LAB_BASE_DIR), "--limit", "2", "--temperature", "0",
                                                    "--max-new-tokens", "24", "--out", str(out)]))
    text = out.with_suffix(".md").read_text()
    rows = load_rows("lab:test:prompt")[:2]
    for i, row in enumerate(rows):
        assert f"## Prompt {i + 1}" in text and row["prompt"][-1]["content"] in text
        reply = payload["responses"][i]
        assert reply["lab"] == reply[str(LAB_BASE_DIR)] and reply["lab"].strip() in text  # greedy, same weights
    assert text.count("**lab**") == 2 and text.count(f"**{LAB_BASE_DIR}**") == 2


# ---------------------------------------------------------------- experiments/sft_then_dpo.py


def test_sft_then_dpo_quick_run(tmp_path: Path):
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "experiments/sft_then_dpo.py"), "--quick", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["base", "sft", "dpo_base", "dpo_sft"]
    for name, scores in results.items():
        assert 0.0 <= scores["accuracy"]["mean"] <= 1.0
        assert ("reward_accuracy" in scores) == name.startswith("dpo")
    assert "| 4 | DPO from SFT |" in (out / "results.md").read_text()
    for run in ("sft", "dpo_base", "dpo_sft"):
        rows = [json.loads(line) for line in (out / f"{run}_seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if not r.get("eval")] == [1, 2, 3]
    dpo_rows = [json.loads(line) for line in (out / "dpo_sft_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert dpo_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # its reference is the SFT checkpoint
    assert json.loads((out / "dpo_sft_seed0" / "final" / "args.json").read_text())["model"].endswith("sft_seed0/final")
    side = (out / "responses.md").read_text()
    for name in ("**base**", "**SFT**", "**DPO from the base (no SFT)**", "**DPO from SFT**"):
        assert side.count(name) == 1
