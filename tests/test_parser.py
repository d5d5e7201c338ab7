"""``Task.parse_answer`` on real-looking model outputs (expectations written by hand)."""

from dataclasses import replace

import pytest

from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE

DISEASES_10 = [
    "Marfan syndrome", "Loeys-Dietz syndrome", "Ehlers-Danlos syndrome", "Homocystinuria",
    "Stickler syndrome", "Noonan syndrome", "Wilson's disease", "22q11.2 deletion syndrome",
    "Trisomy 21", "Neurofibromatosis type 1",
]


def parse(text: str) -> tuple[bool, bool, list[str]]:
    p = RARE_DISEASE.parse_answer(text)
    return p.header_found, p.parseable, p.items


@pytest.mark.parametrize("task, labels", [
    (RARE_DISEASE, DISEASES_10),
    (TISSUE_TYPE, ["Head & Neck", "Lung", "Adrenal Glands", "Bile Duct", "Colon"]),
])
def test_own_format_round_trips(task, labels):
    parsed = task.parse_answer(task.format_answer(labels))
    assert parsed.parseable
    assert parsed.items == labels


def test_prose_before_and_after_the_list():
    text = ("Sure! Based on the phenotypes described, here is my answer.\n\n"
            "POTENTIAL_DISEASES:\n1. 'Marfan syndrome'\n2. 'Loeys-Dietz syndrome'\n"
            "3. 'Homocystinuria'\n\nThese are ranked by how well they fit. Let me know "
            "if you need more detail.")
    assert parse(text) == (True, True, ["Marfan syndrome", "Loeys-Dietz syndrome",
                                        "Homocystinuria"])


def test_missing_and_mixed_quotes():
    text = ("POTENTIAL_DISEASES:\n1. Marfan syndrome\n2. \"Noonan syndrome\"\n"
            "3. 'Stickler syndrome\n4. `Homocystinuria`\n5. ‘Alport syndrome’")
    assert parse(text)[2] == ["Marfan syndrome", "Noonan syndrome", "Stickler syndrome",
                              "Homocystinuria", "Alport syndrome"]


@pytest.mark.parametrize("n", [9, 11])
def test_wrong_number_of_items_is_kept_as_given(n):
    names = [f"Disease {chr(ord('A') + i)}" for i in range(n)]
    text = "POTENTIAL_DISEASES:\n" + "\n".join(f"{i}. '{x}'" for i, x in enumerate(names, 1))
    assert parse(text) == (True, True, names)


def test_near_miss_spelling_is_kept_verbatim():
    # The parser does not correct names; the fuzzy match does (see test_metrics).
    assert parse("POTENTIAL_DISEASES:\n1. 'Marfan syndrom'")[2] == ["Marfan syndrom"]


def test_markdown_bold_header_and_items():
    text = ("**POTENTIAL_DISEASES:**\n\n1. **Marfan syndrome**\n**2.** 'Noonan syndrome'\n"
            "3. **'Stickler syndrome'** - less likely")
    assert parse(text) == (True, True, ["Marfan syndrome", "Noonan syndrome",
                                        "Stickler syndrome"])


def test_missing_header_is_not_parseable_but_items_are_read():
    found, parseable, items = parse("Here are my guesses:\n1. 'Marfan syndrome'\n2. 'Noonan'")
    assert (found, parseable) == (False, False)
    assert items == ["Marfan syndrome", "Noonan"]


@pytest.mark.parametrize("header", ["potential_diseases:", "Potential_Diseases:",
                                    "POTENTIAL_DISEASES", "### POTENTIAL_DISEASES:"])
def test_header_in_other_case_or_markup(header):
    assert parse(f"{header}\n1. 'Marfan syndrome'") == (True, True, ["Marfan syndrome"])


def test_numbered_with_parenthesis_colon_and_bullets():
    text = "POTENTIAL_DISEASES:\n1) Marfan syndrome\n2: Noonan syndrome\n- 3. Homocystinuria"
    assert parse(text)[2] == ["Marfan syndrome", "Noonan syndrome", "Homocystinuria"]


def test_apostrophe_inside_a_quoted_name():
    text = ("POTENTIAL_DISEASES:\n1. 'Wilson's disease'\n2. \"Crohn's disease\"\n"
            "3. 'Hirschsprung's disease' - constipation")
    assert parse(text)[2] == ["Wilson's disease", "Crohn's disease", "Hirschsprung's disease"]


def test_explanations_after_the_name_are_cut():
    text = ("POTENTIAL_DISEASES:\n1. 'Marfan syndrome' because of the lens dislocation\n"
            "2. Noonan syndrome: short stature and webbed neck\n"
            "3. Neurofibromatosis type 1 (NF1)\n4. Homocystinuria - tall stature\n"
            "5. Ehlers-Danlos syndrome, vascular type")
    assert parse(text)[2] == ["Marfan syndrome", "Noonan syndrome", "Neurofibromatosis type 1",
                              "Homocystinuria", "Ehlers-Danlos syndrome, vascular type"]


def test_numbers_inside_names_are_kept():
    text = ("POTENTIAL_DISEASES:\n1. 22q11.2 deletion syndrome\n2. 'Trisomy 21'\n"
            "3. 3-M syndrome\n4. Spinocerebellar ataxia type 3")
    assert parse(text)[2] == ["22q11.2 deletion syndrome", "Trisomy 21", "3-M syndrome",
                              "Spinocerebellar ataxia type 3"]


def test_header_and_list_on_one_line():
    assert parse("POTENTIAL_DISEASES: 1. 'Marfan syndrome' 2. 'Trisomy 21' 3) Noonan syndrome")[
        2] == ["Marfan syndrome", "Trisomy 21", "Noonan syndrome"]
    assert parse("POTENTIAL_DISEASES: 1. 'Marfan syndrome'\n2. 'Noonan syndrome'")[2] == [
        "Marfan syndrome", "Noonan syndrome"]


def test_a_second_list_in_trailing_prose_is_ignored():
    text = ("POTENTIAL_DISEASES:\n1. 'Marfan syndrome'\n2. 'Noonan syndrome'\n\n"
            "Reasoning:\n1. The patient is tall.\n2. Lens dislocation.")
    assert parse(text)[2] == ["Marfan syndrome", "Noonan syndrome"]


@pytest.mark.parametrize("text, expected", [
    ("", (False, False, [])),
    ("I am not able to give a diagnosis.", (False, False, [])),
    ("POTENTIAL_DISEASES:\n", (True, False, [])),
    ("POTENTIAL_DISEASES:\nI don't know.", (True, False, [])),
])
def test_answers_without_items(text, expected):
    assert parse(text) == expected


def test_windows_line_endings():
    assert parse("POTENTIAL_DISEASES:\r\n1. 'Marfan syndrome'\r\n2. 'Noonan syndrome'\r\n")[
        2] == ["Marfan syndrome", "Noonan syndrome"]


def test_tissue_answers():
    text = ("MOST_LIKELY_TISSUE:\n1. Head & Neck\n2. 'Lung'\n3. Colon.\n4) **Skin**\n"
            "5. Adrenal Glands\n6. Breast")
    parsed = TISSUE_TYPE.parse_answer(text)
    assert parsed.parseable
    assert parsed.items == ["Head & Neck", "Lung", "Colon", "Skin", "Adrenal Glands", "Breast"]
    inline = TISSUE_TYPE.parse_answer(
        "most_likely_tissue: 1. Lung 2. Breast 3. Colon 4. Skin 5. Liver")
    assert inline.items == ["Lung", "Breast", "Colon", "Skin", "Liver"]


def test_prompt_record_round_trips_overrides() -> None:
    custom = replace(RARE_DISEASE, system_prompt="You are brief.", instruction="List {n} under {header}.")
    record = custom.prompt_record(n_answers=5)
    assert record == {"system_prompt": "You are brief.", "instruction": "List {n} under {header}.",
                      "n_answers": 5, "candidates": None}
    served = RARE_DISEASE.with_prompt_record(record)
    assert served.prompt_messages(note="a note") == custom.prompt_messages(note="a note", n_answers=5)
    # A student without a record (trained before it existed) is prompted with the defaults.
    assert RARE_DISEASE.with_prompt_record(None) == RARE_DISEASE
    tissue = TISSUE_TYPE.with_prompt_record(TISSUE_TYPE.prompt_record(3, ["Colon", "Liver", "Lung"]))
    assert tissue.labels == ("Colon", "Liver", "Lung") and tissue.n_answers == 3
