"""Tissue of origin from an H&E cell-nucleus image (MINT application 2)."""

import re

from mint_ray.tasks.base import Task

TISSUE_TYPES = (
    "Adrenal Glands", "Bile Duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus",
    "Head & Neck", "Kidney", "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin",
    "Stomach", "Testis", "Thyroid", "Uterus",
)

TISSUE_TYPE = Task(
    name="tissue_type",
    modality="image",
    header="MOST_LIKELY_TISSUE:",
    n_answers=5,
    item_noun="tissue",
    system_prompt=(
        "You are a pathologist analysing H&E-stained images of cell nuclei. You identify "
        "the tissue of origin and always keep the requested output format exactly."
    ),
    instruction=(
        "Which tissue does this nucleus image come from? Answer with the header {header} "
        "followed by a numbered list of exactly {n} tissues from the candidates, most "
        "likely first. Give no explanations."
    ),
    quote_items=False,
    labels=TISSUE_TYPES,
    registered_model="mint-tissue-type-vision",
)


def tissue_id(name: str) -> str:
    """A stable slug id: ``Head & Neck`` -> ``head_neck``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
