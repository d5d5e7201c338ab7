"""What a finished training run trained on, in tokens, recomputed on the driver.

The run's summary (``training`` in the model's metadata) gives its steps and world
size. The tokens follow from them: the same rows (``training_rows``), encoded the
same way (``encode_rows``) and dealt out by the worker's own schedule
(``shard_for_rank``), counted as the worker counts a batch
(``PreferenceBatch.num_tokens``: the prompt once, the chosen and the rejected
answer, after truncation). Those are the tokens the model was run on; an SFT
step forwards the rejected answer too, though its loss reads only the chosen one.
"""

from __future__ import annotations

from pathlib import Path

from mint_ray import students
from mint_ray.training.batching import EncodedPair, encode_rows
from mint_ray.training.config import Config
from mint_ray.training.data import training_rows
from mint_ray.training.worker import shard_for_rank


def pair_tokens(pair: EncodedPair) -> int:
    """A pair's share of ``PreferenceBatch.num_tokens``."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def scheduled_tokens(pairs: list[EncodedPair], steps: int, world: int, micro_batch: int,
                     accumulation: int, seed: int) -> int:
    """Tokens that ``steps`` optimizer steps of the worker loop go through, over all ranks.

    Step ``s`` of epoch ``e`` takes, on every rank, micro batches ``s * accumulation ..``
    of that rank's shuffled share for ``e`` (``worker.train_loop``).
    """
    per_step = micro_batch * accumulation
    steps_per_epoch = (len(pairs) // world) // per_step
    if steps <= 0 or steps_per_epoch == 0:
        return 0
    total = 0
    shards: dict[int, list[list[EncodedPair]]] = {}
    for step in range(steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in shards:
            shards = {epoch: [shard_for_rank(pairs, rank, world, seed, epoch) for rank in range(world)]}
        for shard in shards[epoch]:
            total += sum(pair_tokens(p) for p in shard[index * per_step:(index + 1) * per_step])
    return total


def trained_tokens(cfg: Config, model_dir: str | Path, steps: int, world: int) -> int:
    """The tokens a finished run of ``cfg`` trained on in its ``steps`` steps on ``world`` ranks,
    with the tokenizer saved beside its model (``model_dir``, a local folder)."""
    tokenizer, _ = students.load_tokenizer_and_processor(model_dir, cfg.model.kind)
    pairs, _ = encode_rows(training_rows(cfg.data), tokenizer, cfg.batching,
                           require_image=cfg.model.kind == "mllama")
    return scheduled_tokens(pairs, steps, world, cfg.optim.micro_batch_size,
                            cfg.optim.gradient_accumulation_steps, cfg.optim.seed)
