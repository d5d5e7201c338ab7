"""Shared-prefix packing vs two sequences per pair: one ORPO step (forward + backward).

Prints figures, asserts nothing. A 4-layer, hidden-256 Llama on the paper's length
profile: prompts cut to 560 tokens by the note rule, 10-item answers of ~80 tokens
on each side, batch 4, 2 CPU threads. Tokens/s counts each pair's distinct tokens
(prompt once + chosen + rejected), the same work in both layouts.

    .venv/bin/python benchmarks/bench_packing.py [--steps 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mint_ray.losses import orpo_loss
from mint_ray.tasks import RARE_DISEASE
from mint_ray.tokenizer import train_tokenizer
from mint_ray.training.batching import PairLengthConfig, PreferenceBatch, collate_pairs, encode_rows
from mint_ray.training.logprobs import policy_logps

TERMS = ["Seizures", "Hypotonia", "Global developmental delay", "Microcephaly", "Tall stature",
         "Arachnodactyly", "Short stature", "Ptosis", "Hypertelorism", "Scoliosis",
         "Intellectual disability", "Cleft palate", "Feeding difficulties", "Strabismus",
         "Hearing impairment", "Ataxia", "Macrocephaly", "Atrial septal defect", "Hernia",
         "Downslanted palpebral fissures", "Brachydactyly", "Clinodactyly", "Joint laxity"]
DISEASES = ["Angelman syndrome", "Rett syndrome", "Marfan syndrome", "Noonan syndrome",
            "Williams syndrome", "Cornelia de Lange syndrome", "Prader-Willi syndrome",
            "Kabuki syndrome", "CHARGE syndrome", "Sotos syndrome", "Fragile X syndrome",
            "Smith-Magenis syndrome", "Coffin-Siris syndrome", "Pitt-Hopkins syndrome",
            "Mowat-Wilson syndrome", "Rubinstein-Taybi syndrome", "Bardet-Biedl syndrome",
            "Joubert syndrome", "Costello syndrome", "Cardiofaciocutaneous syndrome"]
PROMPT_TOKENS, BATCH = 560, 4


def make_batch(rng: random.Random) -> tuple[PreferenceBatch, int]:
    notes = [f"Sex {rng.choice(['male', 'female'])} Age {rng.randint(1, 16)} years. "
             + ", ".join(rng.choices(TERMS, k=200)) + "." for _ in range(BATCH)]
    rows = []
    for note in notes:
        ranked = rng.sample(DISEASES, k=20)
        rows.append({"prompt": RARE_DISEASE.prompt_messages(note=note),
                     "chosen": RARE_DISEASE.answer_message(ranked[:10]),
                     "rejected": RARE_DISEASE.answer_message(ranked[10:])})
    corpus = [RARE_DISEASE.system_prompt, RARE_DISEASE.instruction, *notes,
              *(RARE_DISEASE.format_answer(DISEASES[i:] + DISEASES[:i]) for i in range(20))]
    tok = train_tokenizer(corpus, vocab_size=1024)
    cfg = PairLengthConfig(max_prompt_length=PROMPT_TOKENS, max_length=PROMPT_TOKENS + 120)
    pairs, stats = encode_rows(rows, tok, cfg)
    print(stats.summary())
    return collate_pairs(pairs, tok.pad_token_id), len(tok)


def step(model: LlamaForCausalLM, batch: PreferenceBatch, packed: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step. CPU time is the steadier
    figure on a shared machine: other processes stretch wall time, not our CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.zero_grad(set_to_none=True)
    out = policy_logps(model, batch, packed=packed)
    loss, _ = orpo_loss(out.chosen, out.rejected, out.chosen_nll, beta=0.1, valid=out.valid)
    loss.backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    batch, vocab = make_batch(random.Random(0))
    p, c, r = batch.prompt_lens, batch.chosen_lens, batch.rejected_lens
    print(f"batch {len(batch)}: prompt {p.float().mean():.0f}, chosen {c.float().mean():.0f}, "
          f"rejected {r.float().mean():.0f} tokens (mean); vocab {vocab}; attn {args.attn}")
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
        attn_implementation=args.attn))
    forwarded = {False: 2 * len(batch) * int(torch.maximum(p + c, p + r).max()),
                 True: len(batch) * int((p + c + r).max())}
    for packed in (False, True):  # warm-up
        step(model, batch, packed)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.steps):  # interleaved, so drift hits both layouts alike
        for packed in (False, True):
            times[packed].append(step(model, batch, packed))
    pair_tokens = batch.num_tokens()
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(f"{'layout':<9}{'fwd tokens':>11}{'s/step':>9}{'pairs/s':>9}{'tokens/s':>10}"
          f"{'speedup':>9}{'cpu-s/step':>12}{'cpu speedup':>13}")
    for packed in (False, True):
        sec = wall[packed]
        print(f"{'packed' if packed else 'unpacked':<9}{forwarded[packed]:>11}{sec:>9.3f}"
              f"{len(batch) / sec:>9.2f}{pair_tokens / sec:>10.0f}{wall[False] / sec:>8.2f}x"
              f"{cpu[packed]:>12.3f}{cpu[False] / cpu[packed]:>12.2f}x")
    print(f"token-count ideal speedup: {forwarded[False] / forwarded[True]:.2f}x")


if __name__ == "__main__":
    main()
