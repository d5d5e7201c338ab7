"""Rare genetic disease from a clinical note (MINT application 1)."""

from mint_ray.tasks.base import Task

RARE_DISEASE = Task(
    name="rare_disease",
    modality="text",
    header="POTENTIAL_DISEASES:",
    n_answers=10,
    item_noun="disease",
    system_prompt=(
        "You are a genetic counselor. From a patient's phenotypes you name the rare "
        "genetic diseases that could explain them. You always keep the requested "
        "output format exactly, with no explanations."
    ),
    instruction=(
        "List exactly {n} potential rare diseases for this patient, most likely first, "
        "as a numbered list under the header {header} with each disease name in single "
        "quotes. Give no explanations."
    ),
    quote_items=True,
    registered_model="mint-rare-disease-text",
)
