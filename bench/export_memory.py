"""`forge export`'s peak memory: reading only a checkpoint's weights (trainer.pt mapped) against
reading the whole file (its optimizer state too), on the same checkpoint, alternated.

    python -m bench.export_memory [--hidden 768] [--layers 8] [--pairs 2]

A full fine-tune's trainer.pt holds the trainable weights and, under AdamW, two more tensors
of each: an export that reads it whole needs room for all three in memory on top of the model
it loads. Each export runs in a fresh process (its own high-water mark, VmHWM, which counts the
file pages a mapping read as well; and the peak of RssAnon, memory only the process holds,
sampled); the baseline process makes torch.load read the file whole, as export did before.
Prints one JSON object and writes bench/results/export-memory.json."""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import save_result

RESULT = Path(__file__).parent / "results" / "export-memory.json"

CHILD = r"""
import functools, json, sys, threading, time
import torch
from bench.memory import resident_mb
anon = [0.0]
def sample():  # RssAnon has no high-water mark of its own: sampled every 2 ms
    while True:
        anon[0] = max(anon[0], resident_mb("RssAnon"))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
if sys.argv[1] == "whole":  # the baseline: export as it read trainer.pt before (no mmap)
    load = torch.load
    torch.load = functools.wraps(load)(lambda *a, **k: load(*a, **{**k, "mmap": False}))
from forge.export import export_checkpoint
before = resident_mb("VmRSS")
started = time.perf_counter()
export_checkpoint(sys.argv[2], out=sys.argv[3])
print(json.dumps({"peak_mb": resident_mb("VmHWM"), "peak_anon_mb": anon[0], "start_mb": before,
                  "seconds": time.perf_counter() - started}))
"""


def make_run(root: Path, hidden: int, layers: int) -> Path:
    """A run folder with one checkpoint of a full fine-tune (AdamW state filled by one step)."""
    import torch
    import yaml
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from forge.config import Config, ModelConfig, TrainConfig, TrainerConfig
    from forge.models.tiny import build_tokenizer
    from forge.train.checkpoint import RUN_STATE_FILE, save_trainer, write_checkpoint
    from forge.train.trainer import Trainer
    from forge.types import Sample

    model_dir = root / "model"
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model_cfg = ModelConfig(path=str(model_dir))
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(Config(model=model_cfg).to_dict(), sort_keys=False))
    trainer = Trainer(model_cfg.path, model_cfg, TrainConfig(), TrainerConfig(packing="padded"))
    tokens = list(range(8, 40))
    trainer.train_step([Sample(tokens, [0] * 8 + [1] * 24, [-1.0] * 32, [0] * 32, advantage=1.0)])

    def write(directory: Path) -> None:
        save_trainer(trainer, directory)
        (directory / RUN_STATE_FILE).write_bytes(pickle.dumps({"step": 1}))

    write_checkpoint(run, 1, write, keep=0)
    return run


def export_once(mode: str, run: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(run), str(out)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"export ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(root, args.hidden, args.layers)
        trainer_mb = next((run / "checkpoints").glob("step-*/trainer.pt")).stat().st_size / 2**20
        weights_mb = sum(p.stat().st_size for p in (root / "model").glob("*.safetensors")) / 2**20
        results: dict[str, list[dict]] = {"mapped": [], "whole": []}
        started = time.perf_counter()
        for pair in range(args.pairs):
            order = ("whole", "mapped") if pair % 2 == 0 else ("mapped", "whole")
            for mode in order:
                out = root / f"out-{mode}-{pair}"
                results[mode].append(export_once(mode, run, out))
    peak = {mode: min(r["peak_mb"] for r in rows) for mode, rows in results.items()}
    anon = {mode: min(r["peak_anon_mb"] for r in rows) for mode, rows in results.items()}
    result = {
        "bench": "export_memory",
        "model": {"hidden": args.hidden, "layers": args.layers, "weights_mb": round(weights_mb, 1)},
        "trainer_pt_mb": round(trainer_mb, 1),
        "peak_mb_mapped": round(peak["mapped"], 1),
        "peak_mb_whole": round(peak["whole"], 1),
        "peak_ratio_whole_over_mapped": round(peak["whole"] / peak["mapped"], 3),
        "saved_mb": round(peak["whole"] - peak["mapped"], 1),
        # Memory only this process holds (not file pages the kernel can drop and read again).
        "peak_anon_mb_mapped": round(anon["mapped"], 1),
        "peak_anon_mb_whole": round(anon["whole"], 1),
        "anon_saved_mb": round(anon["whole"] - anon["mapped"], 1),
        "runs": results,
        "pairs": args.pairs,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    save_result(result, RESULT)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
