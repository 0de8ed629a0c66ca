"""Load and save Qwen2 checkpoints in the HF layout (config.json + safetensors, single or sharded).

The model is built on the meta device and the checkpoint's tensors are assigned into it, so a model never holds two
copies of its weights. Saving writes the same layout back (tied LM head omitted, as HF does), into a temporary
directory that is renamed into place only when complete.

Two kinds of checkpoint: a causal LM (`lm_head.weight`, or tied to the embedding) loads with `load_model`; a reward
model, the reference's Qwen2ForSequenceClassification with one output (`score.weight` (1, C), no LM head), with
`load_reward_model`, which can also start one from a causal LM by giving it a fresh score head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import DTYPE_NAMES, Qwen2Config
from model.errors import UserError
from model.qwen2 import Qwen2ForCausalLM, Qwen2ForSequenceClassification

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.model"]
SAFE_INDEX = "model.safetensors.index.json"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are very slow there), bfloat16 on CUDA, unless named."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise UserError(f"--dtype {name} is not supported; choose one of {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, name)


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local HF-layout directory, or a hub id downloaded (and cached) with huggingface-hub."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; --model needs a checkpoint directory (config.json + safetensors).")
        return path
    name = str(name_or_path)
    if not HUB_ID.match(name):
        raise UserError(f"model directory {path} does not exist; pass an existing directory or a hub id like "
                        f"Qwen/Qwen2.5-0.5B.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise UserError(f"{name} is neither a local directory nor a model on the hub; check the spelling.")
    except (LocalEntryNotFoundError, OSError, ConnectionError) as e:  # offline, DNS failure, timeout
        raise UserError(f"could not download {name} from the hub and no cached copy exists ({type(e).__name__}); "
                        f"connect to the network once or pass a local checkpoint directory.")


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e}); restore it from the checkpoint.")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise UserError(f"{model_dir} has no model.safetensors nor {SAFE_INDEX}; point --model at an HF checkpoint "
                        f"saved in safetensors format.")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is listed in {index} but missing; re-download the checkpoint.")
    return files


def _read_state(model_dir: Path, device, dtype: torch.dtype, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint but those named in `skip`, on `device` in `dtype`; non-finite ones refused."""
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(model_dir):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in skip:
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise UserError(f"{file}: tensor {key} holds non-finite values (nan or inf), so this "
                                        "checkpoint cannot be trained or evaluated; use an earlier checkpoint.")
                    state[key] = tensor.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}); re-download or re-save it.")
    return state


def _checkpoint_keys(model_dir: Path) -> set[str]:
    keys: set[str] = set()
    for file in _checkpoint_files(model_dir):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys.update(f.keys())
        except SafetensorError as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}); re-download or re-save it.")
    return keys


def _check_keys(model_dir: Path, state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    problems = [f"missing {k} {list(s)}" for k, s in expected.items() if k not in state]
    problems += [f"unexpected {k} {list(state[k].shape)}" for k in state if k not in expected]
    problems += [f"{k} has shape {list(state[k].shape)}, config.json implies {list(s)}"
                 for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    if problems:
        raise UserError(f"{model_dir} does not match its config.json: " + "; ".join(problems) + ".")


def _resolve(name_or_path, dtype, device) -> tuple[Path, torch.dtype, str]:
    device = device or default_device()
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, device)
    return resolve_model_dir(name_or_path), dtype, device


def load_model(name_or_path: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None,
               ) -> tuple[Qwen2ForCausalLM, Path]:
    """Build the decoder from config.json and assign the safetensors weights into it. Returns (model, model_dir)."""
    model_dir, dtype, device = _resolve(name_or_path, dtype, device)
    config = Qwen2Config.from_hf(model_dir)
    if "score.weight" in _checkpoint_keys(model_dir):
        raise UserError(f"{model_dir} is a reward model (Qwen2ForSequenceClassification: score.weight, no LM head), "
                        f"not a language model; load it with load_reward_model, or pass a causal LM checkpoint.")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    # some tied checkpoints store the shared matrix twice
    state = _read_state(model_dir, device, dtype, {"lm_head.weight"} if config.tie_word_embeddings else set())
    _check_keys(model_dir, state, expected)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval(), model_dir


def load_reward_model(name_or_path: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None,
                      init_head: bool = False, seed: int = 0) -> tuple[Qwen2ForSequenceClassification, Path]:
    """A reward model (Qwen2ForSequenceClassification with one output) and its directory.

    A reward checkpoint (with `score.weight`) loads as it is. A causal LM checkpoint (no score.weight; its LM head
    is dropped) becomes one with `init_head`: the body is the LM's, the score head fresh, normal(0,
    initializer_range of config.json, else 0.02) as the reference initialises it, drawn from a generator seeded with
    `seed` (the same seed gives the same head). Without `init_head` a causal LM is refused.
    """
    model_dir, dtype, device = _resolve(name_or_path, dtype, device)
    config = Qwen2Config.from_hf(model_dir)
    has_head = "score.weight" in _checkpoint_keys(model_dir)
    if not has_head and not init_head:
        raise UserError(f"{model_dir} is not a reward model (no score.weight); train one with train.py --loss "
                        f"reward, or pass a checkpoint written by one.")
    if not has_head:
        config = replace(config, num_labels=1)
    with torch.device("meta"):
        model = Qwen2ForSequenceClassification(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = _read_state(model_dir, device, dtype, {"lm_head.weight"})
    if has_head and state["score.weight"].shape[0] != 1:
        raise UserError(f"{model_dir}: score.weight has shape {list(state['score.weight'].shape)}, so the head has "
                        f"{state['score.weight'].shape[0]} outputs; a reward model has 1 (pass a checkpoint trained "
                        f"with train.py --loss reward).")
    if not has_head:
        std = json.loads((model_dir / "config.json").read_text()).get("initializer_range") or 0.02
        gen = torch.Generator().manual_seed(seed)
        state["score.weight"] = (torch.randn(expected["score.weight"], generator=gen) * std).to(device=device,
                                                                                                dtype=dtype)
    _check_keys(model_dir, state, expected)
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval(), model_dir


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


def atomic_replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a complete temp directory to out_dir; an existing out_dir is replaced only after the new one is whole."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def recover_interrupted_saves(parent: str | Path) -> list[str]:
    """Undo what killed `save_model` calls left in `parent`; returns what was done, one phrase per item.

    A kill while the files were written leaves a temp directory `.NAME.tmp-*`: removed. A kill inside
    `atomic_replace_dir`, between its two renames, leaves the previous checkpoint as `NAME.old` and no `NAME`: put
    back (and a `NAME.old` next to a whole `NAME` is removed)."""
    parent = Path(parent)
    done: list[str] = []
    if not parent.is_dir():
        return done
    for tmp in sorted(parent.glob(".*.tmp-*")):
        if tmp.is_dir():
            shutil.rmtree(tmp)
            done.append(f"removed {tmp.name}")
    for old in sorted(parent.glob("*.old")):
        if not old.is_dir():
            continue
        target = old.with_name(old.name.removesuffix(".old"))
        if target.exists():
            shutil.rmtree(old)
            done.append(f"removed {old.name}")
        else:
            os.replace(old, target)
            done.append(f"restored {target.name} from {old.name}")
    return done


def save_model(model: Qwen2ForCausalLM | Qwen2ForSequenceClassification, out_dir: str | Path, tokenizer=None,
               source_dir: str | Path | None = None, max_shard_bytes: int = 2 * 1024**3, extra_writer=None) -> Path:
    """Write an HF-layout checkpoint: config.json, model.safetensors (sharded past max_shard_bytes), tokenizer files,
    and generation_config.json from source_dir. `extra_writer(tmp_dir)` may add files (e.g. training state) so that
    they land atomically with the weights. A reward model is written as the reference's
    Qwen2ForSequenceClassification (score.weight, no LM head; its architecture, labels and pad_token_id in config.json)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # a reward model has no LM head to omit
        dtype = next(iter(state.values())).dtype
        reward = isinstance(model, Qwen2ForSequenceClassification)  # isinstance: FSDP2 subclasses the model's class
        config = model.config.to_hf("Qwen2ForSequenceClassification" if reward else "Qwen2ForCausalLM")
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards = _shards(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
            shutil.copy(Path(source_dir) / "generation_config.json", tmp / "generation_config.json")
        if extra_writer is not None:
            extra_writer(tmp)
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
