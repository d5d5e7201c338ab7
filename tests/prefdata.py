"""Small preference tables for the training/evaluation tests (the shape the
preference stage writes), built with the task module's own templates."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
from PIL import Image

from mint_ray import storage
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE, TISSUE_TYPES

DISEASES = [f"Syndrome {c}{i}" for c in "ABCDEFG" for i in range(3)]
TERMS = ["Seizures", "Hypotonia", "Macrocephaly", "Short stature", "Ptosis", "Cleft palate", "Scoliosis"]


def _png(colour: tuple[int, int, int], size: int = 56) -> bytes:
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour) + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_text_prefs(uri: str, n: int, seed: int = 0, split: str = "train") -> storage.Manifest:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randrange(len(DISEASES))
        note = f"Sex {'male' if i % 2 else 'female'} Age {i % 9 + 1} years " + " ".join(rng.sample(TERMS, 3))
        ranking = [DISEASES[(label + j) % len(DISEASES)] for j in range(len(DISEASES))]
        rows.append({"sample_id": f"s{i}", "split": split, "label": DISEASES[label],
                     "prompt": RARE_DISEASE.prompt_messages(note),
                     "chosen": RARE_DISEASE.answer_message(ranking[:10]),
                     "rejected": RARE_DISEASE.answer_message(ranking[-10:])})
    return storage.write_dataset(uri, pa.Table.from_pylist(rows), overwrite=True,
                                 meta={"task": "rare_disease", "teacher": {"name": "test", "version": "0"}})


def write_vision_prefs(uri: str, n: int, seed: int = 0, split: str = "train") -> storage.Manifest:
    rng = random.Random(seed)
    labels = list(TISSUE_TYPES)
    rows = []
    for i in range(n):
        label = rng.randrange(len(labels))
        image_uri = storage.join(uri + "-images", f"s{i}.png")
        storage.write_bytes(image_uri, _png((label * 13 % 256, 80, 200 - label * 7)))
        ranking = [labels[(label + j) % len(labels)] for j in range(len(labels))]
        rows.append({"sample_id": f"s{i}", "split": split, "label": labels[label], "image_uri": image_uri,
                     "prompt": TISSUE_TYPE.prompt_messages(candidates=labels),
                     "chosen": TISSUE_TYPE.answer_message(ranking[:5]),
                     "rejected": TISSUE_TYPE.answer_message(ranking[-5:])})
    return storage.write_dataset(uri, pa.Table.from_pylist(rows), overwrite=True,
                                 meta={"task": "tissue_type", "teacher": {"name": "test", "version": "0"}})
