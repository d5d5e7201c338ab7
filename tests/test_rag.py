"""The RAG baseline's retrieval (pure) and its prompts, plus one check on the real HPO annotations."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mint_ray.errors import MintError
from mint_ray.evaluation import rag
from mint_ray.tasks import RARE_DISEASE

CORPUS = [
    ("Dwarfism X", ["Short stature", "Seizure", "Ptosis"]),
    ("Epilepsy Y", ["Seizure"]),
    ("Epilepsy Z", ["Seizure", "Hypotonia", "Cleft palate", "Scoliosis", "Tall stature"]),
    ("Unrelated W", ["Hearing loss"]),
    ("Dwarfism X", ["Myopia"]),  # the same disease under a second id: merged
]


@pytest.fixture(scope="module")
def index() -> rag.PhenotypeIndex:
    return rag.build_index(CORPUS)


def test_index_merges_names_and_weights_rare_terms_higher(index: rag.PhenotypeIndex) -> None:
    assert index.diseases == ("Dwarfism X", "Epilepsy Y", "Epilepsy Z", "Unrelated W")
    assert index.weights["ptosis"] > index.weights["seizure"]  # 1 of 4 diseases vs 3 of 4
    assert index.max_words == 2


def test_phenotypes_are_found_longest_first_and_once(index: rag.PhenotypeIndex) -> None:
    note = "Sex male Age 3 years. Short-stature, SEIZURE and ptosis; seizure again. Stature fine."
    assert rag.find_phenotypes(note, index) == ["short stature", "seizure", "ptosis"]
    assert rag.find_phenotypes("nothing known here", index) == []


def test_retrieval_ranks_by_explained_share_then_specificity(index: rag.PhenotypeIndex) -> None:
    ranked = rag.retrieve(index, ["seizure", "ptosis"], top_n=10)
    assert [name for name, _ in ranked] == ["Dwarfism X", "Epilepsy Y", "Epilepsy Z"]
    assert ranked[0][1] == pytest.approx(1.0)
    # Equal share: the disease with fewer (weighted) annotations is the more specific match.
    assert [name for name, _ in rag.retrieve(index, ["seizure"], top_n=2)] == ["Epilepsy Y", "Dwarfism X"]
    assert rag.retrieve(index, ["unknown term"], top_n=5) == []


def test_note_round_trips_through_the_task_template_and_gets_candidates(index: rag.PhenotypeIndex) -> None:
    note = "Sex female Age 2 years Ethnicity European Seizure, Ptosis"
    prompt = RARE_DISEASE.prompt_messages(note)
    assert rag.note_from_prompt(RARE_DISEASE, prompt) == note
    messages, candidates = rag.rag_prompt(RARE_DISEASE, prompt, index, top_n=2)
    assert candidates == ["Dwarfism X", "Epilepsy Y"]
    assert messages == RARE_DISEASE.prompt_messages(note, candidates)
    assert "Candidates: Dwarfism X, Epilepsy Y." in messages[1]["content"]
    # No shared phenotype: the prompt stays as it was.
    plain = RARE_DISEASE.prompt_messages("Sex male Age 1 years")
    assert rag.rag_prompt(RARE_DISEASE, plain, index, top_n=3) == (plain, [])


def test_prompts_of_another_wording_are_refused_not_misread() -> None:
    reworded = replace(RARE_DISEASE, instruction="Name {n} diseases under {header}.")
    prompt = reworded.prompt_messages("Seizure", n_answers=5)
    assert rag.note_from_prompt(reworded, prompt, n_answers=5) == "Seizure"
    with pytest.raises(MintError, match="does not follow the rare_disease template"):
        rag.note_from_prompt(RARE_DISEASE, prompt)


def test_real_hpo_annotations_retrieve_the_disease_from_its_signs() -> None:
    from mint_ray import hpo

    ontology = hpo.load()
    disease = next(d for d in ontology.diseases.values()
                   if d.source == "OMIM" and len(d.annotations) >= 15)
    signs = [ontology.names[a.hpo_id] for a in sorted(disease.annotations, key=lambda a: a.hpo_id)[:6]]
    note = "Sex male Age 4 years Ethnicity European " + ", ".join(signs)
    index = rag.hpo_index()
    assert len(index) > 10_000
    assert set(rag.find_phenotypes(note, index)) == {rag.normalise_term(s) for s in signs}
    found = [name for name, _ in rag.retrieve(index, rag.find_phenotypes(note, index), top_n=10)]
    assert disease.name in found
    within = rag.hpo_index([disease.name, "Not A Disease"])
    assert within.diseases == (disease.name,)
    with pytest.raises(MintError, match="none of the 1 labels"):
        rag.hpo_index(["Not A Disease"])
