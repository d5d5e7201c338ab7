"""One ORPO step (forward + backward) with Llama 3's vocabulary: peak memory and pairs/s.

Prints figures, asserts nothing. One tiny-depth Llama (2 layers, hidden 256) with Llama 3's
vocabulary (128,256 tokens), the paper's length profile (prompts cut to ~560 tokens by the
note rule, ~80-token answers on each side, micro-batch 3 as in the text recipe), and the
same three rows, tokenized once by TRL, for every arm:

  (a) trl       TRL's ORPOTrainer: ``get_batch_loss_metrics`` (its concatenated,
                full-logits form) then ``backward``, as its training step computes it
  (b) unpacked  ours, two rows per pair, full logits
  (c) packed    ours, ``[prompt|chosen|rejected]``, full logits
  (d) chunked   ours, packed, LM head in 1024-token chunks (the prod recipes'
                ``loss.logits_chunk_tokens``), only where the loss reads
  (e) liger     Liger-Kernel's ``LigerFusedLinearORPOLoss`` on the model's hidden states
                (skipped, with the reason, when ``liger_kernel`` does not import)

Every arm computes TRL's loss (NLL over the whole chosen sequence, beta 0.1; Liger through
its ``nll_target``) and prints it, so the arms can be seen to compute the same thing.
Each arm runs in its own subprocess, so one arm's allocations cannot hide another's.
Memory is the step's peak above what was resident before it: on CPU the process RSS
high-water mark (reset through ``/proc/self/clear_refs`` before each step; glibc's mmap
threshold is pinned at 64 KiB in every arm, so freed tensors leave RSS at once), on a GPU
``torch.cuda.max_memory_allocated``. One warm-up step, then ``--steps`` measured ones;
pairs/s uses the median wall time, and process CPU time is printed beside it (the
steadier figure on a shared machine).

    .venv/bin/python benchmarks/bench_loss_memory.py [--train lora|full] [--steps 2]
    .venv/bin/python benchmarks/bench_loss_memory.py --plot   # the PNG from saved results

``--train lora`` (the default) is the paper's setting: LoRA on every linear layer but the
LM head, which stays frozen; ``--train full`` trains every weight, the head's included.
TRL and Liger come with the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VOCAB, PAIRS, CHUNK = 128_256, 3, 1024
ARMS = ["trl", "unpacked", "packed", "chunked", "liger"]
LABELS = {"trl": "(a) TRL ORPOTrainer", "unpacked": "(b) ours unpacked", "packed": "(c) ours packed",
          "chunked": "(d) ours packed + chunked", "liger": "(e) Liger fused ORPO"}
TICKS = {"trl": "(a) TRL", "unpacked": "(b) ours\nunpacked", "packed": "(c) ours\npacked",
         "chunked": "(d) ours packed\n+ chunked", "liger": "(e) Liger"}
RESULTS = Path(__file__).parent / "results"


# ---- the rows, the model, TRL's trainer ---------------------------------------------------


def tokenizer() -> Any:
    """A word-level tokenizer over ``t0 .. t128255``: text rows map to exactly these ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    del vocab["t0"], vocab["t1"], vocab["t2"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def rows() -> list[dict[str, str]]:
    """Three pairs on the paper's profile; TRL adds BOS to the prompt and EOS to each answer."""
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(n))

    return [{"prompt": text(rng.randint(520, 559)), "chosen": " " + text(rng.randint(70, 90)),
             "rejected": " " + text(rng.randint(70, 90))} for _ in range(PAIRS)]


def model(train: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if train == "lora":  # the paper's targets (all linear layers but the head), r scaled to hidden 256
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
    return m.train()


def trl_trainer(policy: torch.nn.Module, out_dir: str) -> Any:
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=out_dir, per_device_train_batch_size=PAIRS, beta=0.1, max_length=1400,
                      report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, seed=0)
    return ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows()),
                       processing_class=tokenizer())


def make_batch(path: Path) -> None:
    """TRL's collated batch of the three rows, saved for every arm."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(model("full"), tmp)
        batch = next(iter(trainer.get_train_dataloader()))
    torch.save({k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)}, path)


def our_batch(trl_batch: dict[str, torch.Tensor]) -> Any:
    """The same tokens as ``EncodedPair``s: prompt = the -100-labelled part, answers the rest."""
    from mint_ray.training.batching import EncodedPair, collate_pairs

    pairs = []
    for i in range(PAIRS):
        parts = {}
        for side in ("chosen", "rejected"):
            ids, mask = trl_batch[f"{side}_input_ids"][i], trl_batch[f"{side}_attention_mask"][i].bool()
            labels = trl_batch[f"{side}_labels"][i]
            parts[side] = (ids[mask & (labels == -100)].tolist(), ids[mask & (labels != -100)].tolist())
        assert parts["chosen"][0] == parts["rejected"][0]
        pairs.append(EncodedPair(parts["chosen"][0], parts["chosen"][1], parts["rejected"][1]))
    return collate_pairs(pairs, pad_id=0)


# ---- one arm, in its own process ----------------------------------------------------------


def _rss_hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def step_fn(arm: str, policy: torch.nn.Module, trl_batch: dict[str, torch.Tensor], out_dir: str) -> Any:
    """A closure running one step of ``arm``; returns the loss."""
    if arm == "trl":
        trainer = trl_trainer(policy, out_dir)

        def trl_step() -> float:
            loss, _ = trainer.get_batch_loss_metrics(policy, trl_batch, train_eval="train")
            loss.backward()
            return float(loss)

        return trl_step
    if arm == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss
        from trl.experimental.orpo import ORPOTrainer

        cat = ORPOTrainer.concatenated_inputs(trl_batch, padding_value=0, device=trl_batch["chosen_labels"].device)
        ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        target = cat["concatenated_labels"][:, 1:]
        nll_target = torch.where(mask == 1, ids, -100)[:, 1:]  # TRL's NLL: the whole chosen sequence
        hf = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        liger = LigerFusedLinearORPOLoss(ignore_index=-100, beta=0.1)

        def liger_step() -> float:
            hidden = hf.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            loss, _ = liger(hf.lm_head.weight, hidden[:, :-1], target, nll_target=nll_target)
            loss.backward()
            return float(loss)

        return liger_step
    from mint_ray.losses import orpo_loss
    from mint_ray.training.logprobs import policy_logps

    batch = our_batch(trl_batch).to(trl_batch["chosen_labels"].device)
    packed, chunk = arm != "unpacked", CHUNK if arm == "chunked" else 0

    def our_step() -> float:
        out = policy_logps(policy, batch, packed=packed, chunk_tokens=chunk)
        loss, _ = orpo_loss(out.chosen, out.rejected, out.chosen_nll, beta=0.1, valid=out.valid)
        loss.backward()
        return float(loss)

    return our_step


def run_arm(arm: str, train: str, batch_path: str, steps: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    policy = model(train).to(device)
    trl_batch = {k: v.to(device) for k, v in torch.load(batch_path).items()}
    with tempfile.TemporaryDirectory() as tmp:
        step = step_fn(arm, policy, trl_batch, tmp)
        peaks, walls, cpus, losses = [], [], [], []
        for i in range(steps + 1):
            policy.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                before = _rss()
                Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here
            wall, cpu = time.perf_counter(), time.process_time()
            losses.append(step())
            if cuda:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            peak = (torch.cuda.max_memory_allocated() if cuda else _rss_hwm()) - before
            if i:  # step 0 is the warm-up (first-touch allocations, torch.compile for Liger)
                peaks.append(peak)
                walls.append(wall)
                cpus.append(cpu)
    return {"arm": arm, "train": train, "device": "cuda" if cuda else "cpu", "peak_bytes": max(peaks),
            "loadavg_1min_after": os.getloadavg()[0],
            "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "loss": losses[-1],
            "walls": walls, "peaks": peaks}


def spawn_arm(arm: str, train: str, batch_path: Path, steps: int) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--arm", arm, "--train", train, "--batch", str(batch_path),
                           "--steps", str(steps)], capture_output=True, text=True, env=env)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"arm": arm, "train": train, "skipped": reason}
    return json.loads(last)


# ---- the table and the plot ---------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    base = next(r for r in results if r["arm"] == "trl" and "skipped" not in r)
    lines = ["| arm | peak MiB | x (a) | s/step | pairs/s | x (a) | CPU s/step | CPU x (a) | loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {LABELS[r['arm']]} | skipped: {r['skipped'][:120]} |||||||")
            continue
        mem = r["peak_bytes"]
        lines.append(f"| {LABELS[r['arm']]} | {mem / 2**20:.0f} | {mem / base['peak_bytes']:.2f} "
                     f"| {r['wall_s']:.2f} | {PAIRS / r['wall_s']:.3f} | {base['wall_s'] / r['wall_s']:.2f} "
                     f"| {r['cpu_s']:.2f} | {base['cpu_s'] / r['cpu_s']:.2f} | {r['loss']:.6f} |")
    return "\n".join(lines)


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        done = [r for r in run["results"] if "skipped" not in r]
        base = next(r for r in done if r["arm"] == "trl")
        xs = [ARMS.index(r["arm"]) + (k - (len(runs) - 1) / 2) * width for r in done]
        mem = [r["peak_bytes"] / base["peak_bytes"] for r in done]
        speed = [base["wall_s"] / r["wall_s"] for r in done]
        cpu = [base["cpu_s"] / r["cpu_s"] for r in done]
        for ax, values in ((axes[0], mem), (axes[1], speed), (axes[2], cpu)):
            bars = ax.bar(xs, values, width, label=f"{run['train']} ({run['device']})")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    for ax, title, target in ((axes[0], "peak step memory, x TRL (lower is better)", 0.35),
                              (axes[1], "pairs/s (wall), x TRL (higher is better)", 1.6),
                              (axes[2], "pairs per CPU-second, x TRL (shared machine: steadier)", 1.6)):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(target, color="red", lw=0.8, ls="--", label=f"target {target}x")
        ax.set_xticks(range(len(ARMS)), [TICKS[a] for a in ARMS], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"ORPO step, Llama-3 vocabulary {VOCAB:,}, {PAIRS} pairs, prompt ~540 + answers ~80", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--plot", action="store_true", help="draw the PNG from the saved JSON results")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.train, args.batch, args.steps)))
        return
    if args.plot:
        plot(sorted(RESULTS.glob("loss_memory_*.json")), RESULTS / "loss_memory.png")
        return
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = Path(tmp, "batch.pt")
        make_batch(batch_path)
        b = torch.load(batch_path)
        print(f"{PAIRS} pairs, vocab {VOCAB:,}, train {args.train}: chosen rows {b['chosen_input_ids'].shape[1]}, "
              f"rejected rows {b['rejected_input_ids'].shape[1]} tokens (padded); prompts "
              f"{[int((lab == -100).sum()) for lab in b['chosen_labels']]} tokens")
        results = []
        for arm in args.arms.split(","):
            t0 = time.time()
            results.append(spawn_arm(arm, args.train, batch_path, args.steps))
            print(f"  {arm}: {time.time() - t0:.0f}s", flush=True)
    print(table(results))
    loads = [r["loadavg_1min_after"] for r in results if "loadavg_1min_after" in r]
    if loads:  # other processes on the machine stretch wall time, not CPU time
        print(f"machine load average (1 min) after each arm: {', '.join(f'{x:.1f}' for x in loads)} "
              f"on {os.cpu_count()} cores")
    device = next((r["device"] for r in results if "device" in r), "cpu")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"loss_memory_{args.train}.json"
    out.write_text(json.dumps({"train": args.train, "device": device, "steps": args.steps,
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
