"""Build the lab's tiny base model: initialise a small Qwen2 and pre-train it with train.py on `lab:pretrain`.

    python experiments/build_lab_base.py                          # rewrites data/lab_assets/base/
    python experiments/build_lab_base.py --out runs/base-rebuild  # e.g. to check that a rebuild is bit for bit

The recipe is the two constants below: the model's shape (LAB_MODEL_CONFIG) and the pre-training command line
(LAB_PRETRAIN_ARGS), run through train.py's public entry points (`parse_args`, `train`), so the base is made by the
same loop every objective uses. The thread count is fixed because the order of floating-point sums in CPU matrix
products depends on it: with the same torch version and CPU, a rebuild is byte-identical to the shipped files.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from cli import Parser, output_dir  # noqa: E402
from data.lab import LAB_BASE_DIR, LAB_TOKENIZER_DIR  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import Qwen2Config, Qwen2ForCausalLM, UserError, save_model  # noqa: E402

# A Qwen2 of 3.3M parameters: the same model code as Qwen2.5, only smaller. The vocabulary is the lab tokenizer's
# ~730 ids rounded up to a multiple of 64.
LAB_MODEL_CONFIG = {
    "vocab_size": 768, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "max_position_embeddings": 512, "torch_dtype": "float32",
}
# Pre-training: plain next-token prediction on the `pretrain` split's text rows (word problems and their worked
# solutions, no chat transcripts: the chat format is what fine-tuning teaches).
LAB_PRETRAIN_ARGS = ["--loss", "sft", "--data", "lab:pretrain", "--max-steps", "3000", "--batch-size", "16",
                     "--pack", "--max-len", "256", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-ratio", "0.02",
                     "--weight-decay", "0.1", "--seed", "0", "--eval-data", "lab:test:text", "--eval-every", "250",
                     "--save-every", "500", "--no-progress"]
LAB_BUILD_THREADS = 2


def build_lab_base(out_dir: str | Path = LAB_BASE_DIR, work_dir: str | Path | None = None) -> Path:
    """Initialise the tiny Qwen2, pre-train it with train.py, and write the final checkpoint and its log to out_dir."""
    torch.set_num_threads(LAB_BUILD_THREADS)
    work = Path(work_dir or tempfile.mkdtemp(prefix="lab_base_"))
    tokenizer = load_tokenizer(LAB_TOKENIZER_DIR)
    config = Qwen2Config.from_hf({**LAB_MODEL_CONFIG, "eos_token_id": tokenizer.eos_token_id})
    init = save_model(Qwen2ForCausalLM(config).init_weights(std=0.02, seed=0), work / "init", tokenizer=tokenizer)
    args = train.parse_args(LAB_PRETRAIN_ARGS + ["--model", str(init), "--out", str(work / "pretrain")])
    print(f"pre-training the lab base model: python train.py {' '.join(LAB_PRETRAIN_ARGS)} (in {work})")
    train.train(args)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(work / "pretrain" / "final", out_dir)
    shutil.copy(work / "pretrain" / "metrics.jsonl", out_dir / "metrics.jsonl")
    # The recorded args name the build's temporary directories; keep the recipe, not this machine's paths.
    recorded = json.loads((out_dir / "args.json").read_text())
    recorded.update(model="<init written by experiments/build_lab_base.py>", out="<build work dir>")
    (out_dir / "args.json").write_text(json.dumps(recorded, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__)
    parser.add_argument("--out", type=output_dir, default=str(LAB_BASE_DIR),
                        help="output directory (default: the shipped one, data/lab_assets/base)")
    parser.add_argument("--work-dir", type=output_dir, default=None,
                        help="where the init and the run go (default: a new temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    try:
        print(f"wrote {build_lab_base(out, args.work_dir)} in {(time.perf_counter() - start) / 60:.1f} min")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
