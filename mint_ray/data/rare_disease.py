"""Rare-disease patients drawn from the real HPO disease annotations (MINT application 1).

Diseases are picked in *confusable groups*: an anchor disease and its nearest
neighbours by shared phenotypes. A patient's note lists a few of its disease's
phenotypes, sampled by their annotated frequencies; for a share of patients
only phenotypes that one look-alike of the group (its "twin" for that patient)
also has, so the text alone cannot tell the two apart. The face image carries a fixed per-disease
"gestalt" (eye spacing, face shape, nose, mouth, ears, tone) plus per-patient
variation, which resolves the group: the knowledge MINT transfers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from mint_ray.config import StrictModel
from mint_ray.data import Case, LabelInfo, images
from mint_ray.errors import ConfigError
from mint_ray.hpo import Annotation, Disease, Hpo
from mint_ray.metrics import is_match, normalise

GENERATOR = "rare_disease/1"
SOURCES = ("OMIM", "ORPHA")
NoteStyle = Literal["gestalt", "paragraph", "mixed"]

# Group members must share at least this share of phenotypes (Jaccard) with
# the anchor to be confusable; above the upper bound two entries are usually
# the same disease under its OMIM and ORPHA ids.
MIN_OVERLAP = 0.08
MAX_OVERLAP = 0.8

# (ethnicity, share of patients, base skin RGB)
ETHNICITIES: tuple[tuple[str, float, images.RGB], ...] = (
    ("European", 0.40, (232, 190, 160)),
    ("African", 0.12, (141, 85, 54)),
    ("East Asian", 0.13, (235, 200, 160)),
    ("South Asian", 0.12, (198, 134, 96)),
    ("Latino", 0.13, (210, 160, 120)),
    ("Middle Eastern", 0.10, (215, 170, 130)),
)
_ETHNICITY_P = np.array([share for _, share, _ in ETHNICITIES]) / sum(s for _, s, _ in ETHNICITIES)
HAIR = ((40, 30, 25), (90, 60, 35), (160, 120, 70), (20, 20, 20), (120, 50, 30))

# The face features a disease gestalt moves (see ``render_face``).
FACE_FEATURES = ("face_width", "face_length", "eye_spacing", "eye_size", "eye_slant",
                 "brow_height", "nose_length", "nose_width", "mouth_width", "mouth_curve",
                 "ear_height", "tone")
# Skin colour shift per unit of the "tone" feature (yellowish vs pale-bluish).
TONE_SHIFT = np.array([10.0, 8.0, -18.0])


class RareDiseaseOptions(StrictModel):
    """How patients are drawn. The defaults leave the text ambiguous inside each
    group of look-alike diseases and let the face resolve it."""

    group_size: int = Field(4, gt=0, description="diseases per confusable group")
    min_terms: int = Field(3, gt=0, description="fewest phenotypes in a note")
    max_terms: int = Field(6, gt=0, description="most phenotypes in a note")
    shared_terms_only: float = Field(
        0.5, ge=0, le=1,
        description="share of patients whose note lists only phenotypes shared with a look-alike")
    noise_terms: float = Field(
        0.3, ge=0, description="mean number of phenotypes borrowed from an unrelated disease")
    gestalt_noise: float = Field(
        0.6, ge=0, description="patient-to-patient face variation relative to between-disease")
    pixel_noise: float = Field(6.0, ge=0, description="Gaussian pixel noise (0-255 scale)")
    face_salience: float = Field(
        1.0, gt=0, le=3,
        description="how far a face feature moves the drawing: 1 is the original world, where "
                    "a 32 px CNN recovers little of the gestalt; larger draws the same features "
                    "with bigger shapes and colour shifts, so the image resolves a group")

    @model_validator(mode="after")
    def _terms_range(self) -> RareDiseaseOptions:
        if self.min_terms > self.max_terms:
            raise ValueError(f"min_terms ({self.min_terms}) exceeds max_terms ({self.max_terms})")
        return self


@dataclass(frozen=True)
class Profile:
    """A picked disease: its group, its face gestalt and, per look-alike of its group
    (by id), the phenotypes both have (look-alikes sharing none are left out)."""

    disease: Disease
    group: int
    shared: dict[str, tuple[Annotation, ...]]
    gestalt: np.ndarray


# ----------------------------------------------------------------- picking diseases


def names_clash(a: str, b: str) -> bool:
    """Whether the evaluator's fuzzy match could take one disease name for the other
    (either way round: the ratio is not symmetric), or one name contains the other."""
    na, nb = normalise(a), normalise(b)
    return na in nb or nb in na or is_match(a, b) or is_match(b, a)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def eligible_diseases(hpo: Hpo, min_phenotypes: int) -> list[Disease]:
    """OMIM/ORPHA diseases with at least ``min_phenotypes`` observed phenotypes, by id."""
    return sorted((d for d in hpo.diseases.values()
                   if d.source in SOURCES and len(d.annotations) >= min_phenotypes),
                  key=lambda d: d.id)


def _grow_group(anchor: int, candidates: Sequence[Disease], used: set[int],
                taken_names: list[str], size: int) -> list[int] | None:
    """The anchor plus its ``size - 1`` nearest free neighbours with distinct names, or None."""
    if anchor in used or any(names_clash(candidates[anchor].name, n) for n in taken_names):
        return None
    members = [anchor]
    names = [*taken_names, candidates[anchor].name]
    terms = candidates[anchor].hpo_ids
    scored = sorted((-jaccard(terms, d.hpo_ids), j) for j, d in enumerate(candidates)
                    if j not in used and j != anchor)
    for neg_score, j in scored:
        if len(members) == size or -neg_score < MIN_OVERLAP:
            break
        if -neg_score > MAX_OVERLAP or any(names_clash(candidates[j].name, n) for n in names):
            continue
        members.append(j)
        names.append(candidates[j].name)
    return members if len(members) == size else None


def select_groups(candidates: Sequence[Disease], n_diseases: int, group_size: int,
                  rng: np.random.Generator) -> list[list[Disease]]:
    """``n_diseases`` diseases in groups of look-alikes (the last group may be smaller).

    Anchors are tried in random order; each takes its nearest neighbours by
    Jaccard overlap of phenotypes, skipping names a fuzzy match would confuse.
    """
    groups: list[list[int]] = []
    used: set[int] = set()
    taken_names: list[str] = []
    for anchor in rng.permutation(len(candidates)):
        remaining = n_diseases - len(used)
        if remaining == 0:
            break
        group = _grow_group(int(anchor), candidates, used, taken_names, min(group_size, remaining))
        if group is not None:
            groups.append(group)
            used.update(group)
            taken_names.extend(candidates[j].name for j in group)
    if len(used) < n_diseases:
        raise ConfigError(
            f"found only {len(used)} distinct diseases in confusable groups of {group_size} "
            f"(sizes.n_diseases={n_diseases}): lower sizes.n_diseases, sizes.min_phenotypes "
            "or rare_disease.group_size")
    return [[candidates[j] for j in g] for g in groups]


def shared_annotations(disease: Disease, group: Sequence[Disease]) -> dict[str, tuple[Annotation, ...]]:
    """Per other member of ``group``: the phenotypes of ``disease`` it also has (if any)."""
    shared = {other.id: tuple(a for a in disease.annotations if a.hpo_id in other.hpo_ids)
              for other in group if other.id != disease.id}
    return {other: terms for other, terms in shared.items() if terms}


def disease_gestalt(disease_id: str) -> np.ndarray:
    """A fixed face-feature vector per disease, the same in every cohort and seed."""
    seed = int.from_bytes(hashlib.sha256(disease_id.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(0.0, 1.0, len(FACE_FEATURES))


def build_profiles(groups: Sequence[Sequence[Disease]]) -> list[Profile]:
    return [Profile(d, g, shared_annotations(d, group), disease_gestalt(d.id))
            for g, group in enumerate(groups) for d in group]


# ----------------------------------------------------------------- one patient


def sample_annotations(pool: Sequence[Annotation], k: int,
                       rng: np.random.Generator) -> list[Annotation]:
    """``k`` distinct phenotypes, each drawn with weight = its annotated frequency."""
    k = min(k, len(pool))
    weights = np.array([a.frequency for a in pool])
    picks = rng.choice(len(pool), size=k, replace=False, p=weights / weights.sum())
    return [pool[int(i)] for i in picks]


def sample_age_months(rng: np.random.Generator) -> int:
    """Mostly children, as in dysmorphology clinics: median about 6 years, long adult tail."""
    return int(min(rng.gamma(1.5, 60.0), 70 * 12))


def format_age(months: int) -> str:
    """``3 years 6 months`` / ``8 months`` / ``1 year`` (GestaltMML's wording)."""
    years, rest = divmod(months, 12)
    if years == 0:
        return f"{rest} month" + ("s" if rest != 1 else "")
    text = f"{years} year" + ("s" if years != 1 else "")
    if rest and years < 18:
        text += f" {rest} month" + ("s" if rest != 1 else "")
    return text


def age_adjective(months: int) -> str:
    """``3-year-old`` / ``8-month-old`` / ``newborn``."""
    if months == 0:
        return "newborn"
    return f"{months}-month-old" if months < 24 else f"{months // 12}-year-old"


def person_noun(sex: str, months: int) -> str:
    if months >= 18 * 12:
        return "man" if sex == "male" else "woman"
    return "boy" if sex == "male" else "girl"


def _in_sentence(label: str) -> str:
    """HPO labels are capitalised; lower the first letter unless it starts an acronym."""
    return label if label[1:2].isupper() else label[:1].lower() + label[1:]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


_OPENERS = (
    "This {age} {person} of {ethnicity} ancestry was referred for genetic evaluation.",
    "We saw this {age} {person} of {ethnicity} descent in the genetics clinic.",
    "This {age} {person}, of {ethnicity} background, presented for a dysmorphology review.",
)
_FINDINGS = (
    "Examination showed {terms}.",
    "Clinical findings included {terms}.",
    "The main features were {terms}.",
)


def gestalt_note(sex: str, months: int, ethnicity: str, labels: Sequence[str]) -> str:
    """GestaltMML's single string: ``Sex male Age 3 years Ethnicity European <labels>``."""
    return f"Sex {sex} Age {format_age(months)} Ethnicity {ethnicity} " + ", ".join(labels)


def paragraph_note(sex: str, months: int, ethnicity: str, labels: Sequence[str],
                   rng: np.random.Generator) -> str:
    """A short clinical paragraph with the same facts."""
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    findings = _FINDINGS[int(rng.integers(len(_FINDINGS)))]
    return (opener.format(age=age_adjective(months), person=person_noun(sex, months),
                          ethnicity=ethnicity)
            + " " + findings.format(terms=_join([_in_sentence(x) for x in labels])))


# ----------------------------------------------------------------- the face


def face_features(gestalt: np.ndarray, months: int, noise: float,
                  rng: np.random.Generator) -> dict[str, float]:
    """Per-patient features in (-1, 1): disease gestalt + individual variation + age."""
    values = np.tanh(0.5 * (gestalt + rng.normal(0.0, noise, len(FACE_FEATURES))))
    features = dict(zip(FACE_FEATURES, values.tolist(), strict=True))
    # Infants have rounder faces and relatively larger eyes; the note states the age.
    child = math.exp(-months / 48.0)
    features["eye_size"] = min(features["eye_size"] + 0.3 * child, 1.0)
    features["face_length"] = max(features["face_length"] - 0.3 * child, -1.0)
    return features


def render_face(f: dict[str, float], skin: images.RGB, hair: images.RGB,
                background: images.RGB, size: int, pixel_noise: float,
                rng: np.random.Generator) -> np.ndarray:
    """A frontal face-like drawing; geometry follows ``f`` (values in (-1, 1))."""
    img, draw = images.canvas(size, background)
    w = float(img.width)
    # Imperfect alignment, as with real face crops.
    cx = w / 2 + rng.normal(0.0, 0.015 * w)
    cy = w / 2 + rng.normal(0.0, 0.015 * w)
    half_w = w * (0.29 + 0.05 * f["face_width"])
    half_h = w * (0.37 + 0.05 * f["face_length"])
    outline = images.shade(skin, -0.35)
    ear_y = cy + 0.07 * w * f["ear_height"]
    for side in (-1, 1):
        draw.ellipse([cx + side * half_w - 0.05 * w, ear_y - 0.08 * w,
                      cx + side * half_w + 0.05 * w, ear_y + 0.08 * w], fill=skin, outline=outline)
    draw.ellipse([cx - half_w, cy - half_h, cx + half_w, cy + half_h], fill=skin, outline=outline)
    draw.chord([cx - half_w, cy - half_h, cx + half_w, cy + 0.2 * half_h], 180, 360, fill=hair)

    eye_y = cy - 0.05 * half_h
    eye_dx = half_w * (0.40 + 0.14 * f["eye_spacing"])
    eye_rx = w * (0.055 + 0.02 * f["eye_size"])
    slant = 0.25 * f["eye_slant"]
    brow_gap = w * (0.035 + 0.025 * f["brow_height"])
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.polygon(images.ellipse_points(ex, eye_y, eye_rx, 0.55 * eye_rx, -side * slant),
                     fill=(250, 250, 250), outline=outline)
        iris = 0.45 * eye_rx
        draw.ellipse([ex - iris, eye_y - iris, ex + iris, eye_y + iris], fill=(50, 40, 35))
        brow_y = eye_y - 0.55 * eye_rx - brow_gap
        draw.line([(ex - eye_rx, brow_y + side * slant * eye_rx),
                   (ex + eye_rx, brow_y - side * slant * eye_rx)], fill=hair, width=max(2, int(0.02 * w)))

    nose_top = eye_y + 0.3 * eye_rx
    nose_y = eye_y + half_h * (0.38 + 0.12 * f["nose_length"])
    nose_dx = w * (0.04 + 0.02 * f["nose_width"])
    draw.polygon([(cx, nose_top), (cx - nose_dx, nose_y), (cx + nose_dx, nose_y)],
                 fill=images.shade(skin, -0.12), outline=outline)

    mouth_y = nose_y + (cy + half_h - nose_y) * 0.42
    mouth_dx = w * (0.09 + 0.035 * f["mouth_width"])
    curve = w * 0.035 * f["mouth_curve"]
    points = [(cx + mouth_dx * t, mouth_y - curve * (1 - t * t)) for t in np.linspace(-1, 1, 9)]
    draw.line(points, fill=(150, 50, 60), width=max(2, int(0.025 * w)))
    return images.to_uint8(images.downsample(img, size), rng, pixel_noise)


def skin_colour(base: images.RGB, tone: float, rng: np.random.Generator) -> images.RGB:
    """Ethnicity's base skin colour, the disease's tone shift and individual variation."""
    rgb = np.asarray(base, dtype=float) + tone * TONE_SHIFT + rng.normal(0.0, 6.0, 3)
    r, g, b = (int(v) for v in np.clip(np.rint(rgb), 0, 255))
    return (r, g, b)


# ----------------------------------------------------------------- the generator


class RareDiseaseGenerator:
    """Patients of ``n_diseases`` real diseases picked in confusable groups."""

    def __init__(self, hpo: Hpo, n_diseases: int, min_phenotypes: int,
                 options: RareDiseaseOptions, image_size: int, note_style: NoteStyle,
                 rng: np.random.Generator) -> None:
        groups = select_groups(eligible_diseases(hpo, min_phenotypes), n_diseases,
                               options.group_size, rng)
        self._hpo = hpo
        self._profiles = build_profiles(groups)
        self._options = options
        self._image_size = image_size
        self._note_style = note_style

    @property
    def catalog(self) -> list[LabelInfo]:
        return [LabelInfo(p.disease.name, p.disease.id) for p in self._profiles]

    def describe(self) -> dict[str, Any]:
        return {"generator": GENERATOR, "hpo_version": self._hpo.version,
                "face_salience": self._options.face_salience,
                "groups": [[p.disease.id for p in self._profiles if p.group == g]
                           for g in sorted({p.group for p in self._profiles})]}

    def _noise_terms(self, profile: Profile, present: set[str],
                     rng: np.random.Generator) -> list[Annotation]:
        """A few phenotypes of diseases outside the patient's group (incidental findings)."""
        others = [p for p in self._profiles if p.group != profile.group]
        picked: list[Annotation] = []
        for _ in range(int(rng.poisson(self._options.noise_terms)) if others else 0):
            donor = others[int(rng.integers(len(others)))]
            (term,) = sample_annotations(donor.disease.annotations, 1, rng)
            if term.hpo_id not in present:
                present.add(term.hpo_id)
                picked.append(term)
        return picked

    def _phenotypes(self, profile: Profile,
                    rng: np.random.Generator) -> tuple[list[str], list[str], str | None]:
        """The note's HPO ids in random order, those borrowed as noise, and the look-alike
        whose shared phenotypes alone were drawn from (None: all of the disease's)."""
        o = self._options
        twins = sorted(profile.shared)
        twin = (twins[int(rng.integers(len(twins)))]
                if twins and rng.random() < o.shared_terms_only else None)
        pool = profile.shared[twin] if twin else profile.disease.annotations
        terms = sample_annotations(pool, int(rng.integers(o.min_terms, o.max_terms + 1)), rng)
        noise = self._noise_terms(profile, {a.hpo_id for a in terms}, rng)
        picked = [a.hpo_id for a in (*terms, *noise)]
        return [picked[int(i)] for i in rng.permutation(len(picked))], [a.hpo_id for a in noise], twin

    def case(self, label_index: int, rng: np.random.Generator) -> Case:
        profile = self._profiles[label_index]
        hpo_ids, noise_ids, twin = self._phenotypes(profile, rng)
        labels = [self._hpo.names[h] for h in hpo_ids]
        sex = "male" if rng.random() < 0.5 else "female"
        months = sample_age_months(rng)
        ethnicity, _, base_skin = ETHNICITIES[int(rng.choice(len(ETHNICITIES), p=_ETHNICITY_P))]
        style = self._note_style if self._note_style != "mixed" else (
            "gestalt" if rng.random() < 0.5 else "paragraph")
        note = (gestalt_note(sex, months, ethnicity, labels) if style == "gestalt"
                else paragraph_note(sex, months, ethnicity, labels, rng))

        features = face_features(profile.gestalt, months, self._options.gestalt_noise, rng)
        # Salience scales the drawing, not the features: which disease a face points to is
        # unchanged, only how many pixels each feature moves (1.0 leaves the images as before).
        features = {name: value * self._options.face_salience for name, value in features.items()}
        image = render_face(features, skin_colour(base_skin, features["tone"], rng),
                            HAIR[int(rng.integers(len(HAIR)))], images.random_rgb(rng, 150, 240),
                            self._image_size, self._options.pixel_noise, rng)
        meta = {"generator": GENERATOR, "label_id": profile.disease.id, "sex": sex,
                "age_months": months, "age": format_age(months), "ethnicity": ethnicity,
                "hpo_ids": hpo_ids, "noise_hpo_ids": noise_ids,
                "ambiguous_with": twin, "confusable_group": profile.group,
                "note_style": style}
        return Case(LabelInfo(profile.disease.name, profile.disease.id), note, image, meta)
