"""Lab names: the specimen, timing and scale hints a local lab name carries, and the LOINC axes of a candidate.

Local lab catalogues write the specimen as a prefix (Finnish: `P -Potassium`, `dU-Urea`, `fS-Glucose`, `Li-Protein`)
or in parentheses (`Potassium (sat. urine)`, `Ammonia (blood)`), the scale as `(qual)` / `(quant)`, and often keep a
unit in a column of their own. `parse_lab` reads them with the tables below into a `LabName`; its `text` is what the
encoder, the classifier and the LLM see ("Potassium in 24 hour Urine" for `Potassium (sat. urine)`): the LOINC
system words, which the target names share. `loinc_axes` splits a LOINC-style candidate name ("Potassium
[Moles/volume] in Serum or Plasma") into component, property, system and scale; `match_features` compares the two.

The tables hold what occurs in the lab sets of data/sample/benchmark (FinOMOP lab names, AmsterdamUMCdb ICU labs);
a prefix not in them is left alone, so "C-reactive protein" and "Anti-Mullerian hormone" stay as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A specimen: the words written into the text, and the family of LOINC systems it is compatible with (a candidate
# whose system is outside the family names another specimen).
SERUM_PLASMA = frozenset({"serum or plasma", "serum", "plasma", "serum, plasma or blood", "platelet poor plasma",
                          "plasma or blood", "blood", "serum or blood"})
BLOOD = frozenset({"blood", "serum, plasma or blood", "blood or tissue", "venous blood", "arterial blood",
                   "capillary blood", "mixed venous blood", "blood arterial", "red blood cells", "plasma or blood",
                   "platelet poor plasma", "serum or plasma", "cord blood", "arterial cord blood"})
URINE = frozenset({"urine", "urine sediment", "urine collected for unspecified duration", "24 hour urine"})
URINE_24H = frozenset({"24 hour urine", "urine collected for unspecified duration", "24 hour urine and serum or "
                       "plasma"})
STOOL = frozenset({"stool", "24 hour stool"})
BODY_FLUID = frozenset({"body fluid", "specimen", "peritoneal fluid", "pleural fluid", "synovial fluid",
                        "extracellular fluid", "drain fluid"})


@dataclass(frozen=True)
class Specimen:
    text: str                        # the LOINC system words written into the rewritten text
    systems: frozenset[str]          # LOINC systems (lower case) a target for this specimen may have
    timing: str = ""                 # "24 hour": a collected specimen
    fasting: bool = False


def _sp(text: str, systems: frozenset[str] | set[str] | None = None, *, timing: str = "",
        fasting: bool = False) -> Specimen:
    return Specimen(text, frozenset(systems) if systems else frozenset({text.lower()}), timing, fasting)


# Finnish lab nomenclature prefixes (case-sensitive: `fS` is fasting serum, `Fs` nothing). Measured in the FinOMOP
# set: `S -` targets are "Serum or Plasma" or "Serum", `P -` mostly "Serum or Plasma", `dU-` "24 hour Urine", ...
PREFIXES: dict[str, Specimen] = {
    "S": _sp("Serum", SERUM_PLASMA), "Se": _sp("Serum", SERUM_PLASMA), "All": _sp("Serum", SERUM_PLASMA),
    "P": _sp("Plasma", SERUM_PLASMA), "B": _sp("Blood", BLOOD), "U": _sp("Urine", URINE),
    "dU": _sp("24 hour Urine", URINE_24H, timing="24 hour"), "nU": _sp("Urine", URINE),
    "F": _sp("Stool", STOOL), "Li": _sp("Cerebral spinal fluid"),
    "fS": _sp("Serum", SERUM_PLASMA, fasting=True), "fP": _sp("Plasma", SERUM_PLASMA, fasting=True),
    "fB": _sp("Blood", BLOOD, fasting=True), "fE": _sp("Red Blood Cells", {"red blood cells", "blood"}, fasting=True),
    "E": _sp("Red Blood Cells", {"red blood cells", "blood"}),
    "aB": _sp("Arterial blood", {"arterial blood", "blood"}), "aP": _sp("Arterial blood", {"arterial blood", "blood"}),
    "vB": _sp("Venous blood", {"venous blood", "blood"}), "cB": _sp("Capillary blood", {"capillary blood", "blood"}),
    "zB": _sp("Mixed venous blood", {"mixed venous blood", "blood"}),
    "uA": _sp("Arterial cord blood", {"arterial cord blood", "cord blood"}),
    "uS": _sp("Cord blood", {"cord blood"}), "uB": _sp("Cord blood", {"cord blood"}),
    "Bm": _sp("Bone marrow", {"bone marrow", "blood or tissue"}), "Pf": _sp("Pleural fluid"),
    "Sy": _sp("Synovial fluid"), "As": _sp("Peritoneal fluid"), "Pd": _sp("Peritoneal dialysis fluid"),
    "Di": _sp("Dialysis fluid", {"dialysis fluid", "peritoneal dialysis fluid"}), "Am": _sp("Amniotic fluid"),
    "Ts": _sp("Tissue", {"tissue", "blood or tissue"}), "Ex": _sp("Sputum"), "Mm": _sp("Mother's milk"),
    "L": _sp("Blood", BLOOD), "Ly": _sp("Blood", BLOOD),
}
# `X -Name` or `X-Name` at the start ("U-erythrocytes" too); `L` and `E` followed by a bare hyphen and a lower-case
# letter are chemistry, not a specimen ("L-dopa", "E-selectin").
_PREFIX = re.compile(r"^\s*([A-Za-z]{1,3})(\s*-\s*)(.+)$")
_BARE_ONLY_UPPER = {"L", "E"}

# Parenthesised (or trailing) specimens, lower case, as the AmsterdamUMCdb ICU names write them (translated from
# Dutch: "sat. urine" is "verz. urine", a collected 24-hour urine). "(blood)" there means a blood sample whose
# target is "Serum or Plasma" as often as "Blood".
WORDS: dict[str, Specimen] = {
    "blood": _sp("Blood", BLOOD | SERUM_PLASMA), "edta blood": _sp("Blood", BLOOD | SERUM_PLASMA),
    "blood gas": _sp("Blood", BLOOD), "serum": _sp("Serum", SERUM_PLASMA), "plasma": _sp("Plasma", SERUM_PLASMA),
    "urine": _sp("Urine", URINE), "sat. urine": _sp("24 hour Urine", URINE_24H, timing="24 hour"),
    "saturation urine": _sp("24 hour Urine", URINE_24H, timing="24 hour"),
    "saturate urine": _sp("24 hour Urine", URINE_24H | URINE, timing="24 hour"),
    "collected urine": _sp("24 hour Urine", URINE_24H, timing="24 hour"),
    "24 hour urine": _sp("24 hour Urine", URINE_24H, timing="24 hour"),
    "faeces": _sp("Stool", STOOL), "feces": _sp("Stool", STOOL), "stool": _sp("Stool", STOOL),
    "feces collected": _sp("24 hour Stool", STOOL, timing="24 hour"),
    "faeces collected": _sp("24 hour Stool", STOOL, timing="24 hour"),
    "liquor": _sp("Cerebral spinal fluid"), "liqueur": _sp("Cerebral spinal fluid"),
    "cerebrospinal fluid": _sp("Cerebral spinal fluid"), "csf": _sp("Cerebral spinal fluid"),
    "ascitic fluid": _sp("Peritoneal fluid"), "ascites": _sp("Peritoneal fluid"),
    "perito. fluid capd": _sp("Peritoneal dialysis fluid"), "dialysate": _sp("Dialysis fluid",
                                                                             {"dialysis fluid",
                                                                              "peritoneal dialysis fluid"}),
    "pleural puncture": _sp("Pleural fluid", {"pleural fluid", "body fluid"}),
    "pleural punct.": _sp("Pleural fluid", {"pleural fluid", "body fluid"}),
    "pleural fluid": _sp("Pleural fluid"), "drain": _sp("Body fluid", BODY_FLUID),
    "other": _sp("Body fluid", BODY_FLUID), "diverse": _sp("Body fluid", BODY_FLUID),
    "bone marrow": _sp("Bone marrow", {"bone marrow", "blood or tissue"}), "semen": _sp("Semen"),
    "br.-alv.lav": _sp("Bronchoalveolar lavage"), "cord blood": _sp("Cord blood"),
}
_PAREN = re.compile(r"\(([^()]*)\)")

# Scale hints: qualitative -> an ordinal ([Presence]) LOINC, quantitative -> Qn.
SCALES: dict[str, str] = {"qual": "Ord", "qual.": "Ord", "kval": "Ord", "qualitative": "Ord",
                          "quant": "Qn", "quant.": "Qn", "quantum": "Qn", "kvant": "Qn", "quantitative": "Qn"}

# A unit column says the LOINC property: mmol/L -> Moles/volume, g/L -> Mass/volume, U/L -> activity, ...
_UNIT_PROPERTY: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^[mnpµu]?mol/(24\s?h|d|day|dag)$", re.I), "Moles/time"),
    (re.compile(r"^[mnpµu]?g/(24\s?h|d|day|dag)$", re.I), "Mass/time"),
    (re.compile(r"^[mnpµuf]?mol/[mdµ]?l$", re.I), "Moles/volume"),
    (re.compile(r"^[mnpµu]?g/[mdµ]?l$", re.I), "Mass/volume"),
    (re.compile(r"^(m|k)?(u|iu|ie|e)/[m]?l$", re.I), "Enzymatic activity/volume"),
    (re.compile(r"^(10\^?\d+|10e\d+|x10\^?\d+|e\d+)/[lµ]?l$", re.I), "#/volume"),
    (re.compile(r"^%$"), "Fraction"),
    (re.compile(r"^s(ec)?$", re.I), "Time"),
    (re.compile(r"^(kpa|mmhg)$", re.I), "Partial pressure"),
    (re.compile(r"^fl$", re.I), "Entitic volume"),
)
UNIT_COLUMNS = ("unit", "units", "sourceUnit", "source_unit", "unitName", "unit_name")


def unit_property(unit: str) -> str:
    """The LOINC property a unit implies ("" where the tables do not know it)."""
    u = unit.strip().replace(" ", "") if unit else ""
    for pat, prop in _UNIT_PROPERTY:
        if pat.match(u):
            return prop
    return ""


@dataclass
class LabName:
    """What `parse_lab` read from a lab name."""

    original: str
    component: str                  # the name without its specimen and scale hints
    specimen: Specimen | None = None
    scale: str = ""                 # Ord | Qn | ""
    unit: str = ""
    prop: str = ""                  # the LOINC property the unit implies
    hints: list[str] = field(default_factory=list)  # what was recognised, for the record

    @property
    def changed(self) -> bool:
        return bool(self.specimen or self.scale or self.prop)

    @property
    def text(self) -> str:
        """The LOINC-like text: "Component [Property] in System" (the parts that are known)."""
        if not self.changed:
            return self.original
        parts = [self.component]
        if self.prop:
            parts.append(f"[{self.prop}]")
        elif self.scale == "Ord":
            parts.append("[Presence]")
        if self.specimen:
            parts.append(f"in {self.specimen.text}")
        if self.specimen and self.specimen.fasting:
            parts.append("--fasting")
        return " ".join(parts)

    def features(self) -> dict[str, str]:
        return {"system": self.specimen.text if self.specimen else "", "scale": self.scale,
                "property": self.prop, "timing": self.specimen.timing if self.specimen else ""}


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip(" ,;-")


def parse_lab(name: str, unit: str = "") -> LabName:
    """Specimen (prefix or parenthesised), scale and unit hints of a lab name; unknown forms are left alone."""
    out = LabName(original=name, component=name.strip(), unit=unit.strip())
    rest = name.strip()
    m = _PREFIX.match(rest)
    if m and m.group(1) in PREFIXES and not (m.group(1) in _BARE_ONLY_UPPER and m.group(2) == "-"
                                             and m.group(3)[:1].islower()):
        out.specimen = PREFIXES[m.group(1)]
        out.hints.append(f"prefix {m.group(1)}")
        rest = m.group(3)
    kept: list[str] = []
    pos = 0
    for pm in _PAREN.finditer(rest):
        word = pm.group(1).strip().lower()
        drop = True
        if word in SCALES and not out.scale:
            out.scale = SCALES[word]
            out.hints.append(f"scale ({pm.group(1)})")
        elif word in WORDS:  # a second specimen word (the prefix said it already) is dropped too
            if out.specimen is None:
                out.specimen = WORDS[word]
                out.hints.append(f"specimen ({pm.group(1)})")
        else:
            drop = False
        kept.append(rest[pos:pm.start()] if drop else rest[pos:pm.end()])
        pos = pm.end()
    kept.append(rest[pos:])
    component = _clean("".join(kept))
    if out.specimen is not None:
        # "Glucose pleural fluid (pleural puncture)": the specimen's own words need not be said twice
        low = component.lower()
        for w in sorted(WORDS, key=len, reverse=True):
            if WORDS[w].text == out.specimen.text and low.endswith(" " + w):
                component = _clean(component[: -len(w)])
                break
    out.component = component or rest.strip()
    if out.unit:
        out.prop = unit_property(out.unit)
        if out.prop:
            out.hints.append(f"unit {out.unit}")
    return out


def unit_of(extra: dict[str, object]) -> str:
    """A unit column's value among a source row's extra columns."""
    lower = {k.lower(): v for k, v in extra.items() if isinstance(k, str)}
    for col in UNIT_COLUMNS:
        v = lower.get(col.lower())
        if isinstance(v, str) and v.strip():
            return v.strip()
    return ""


# ------------------------------------------------------------------------------------------------ LOINC names


@dataclass(frozen=True)
class LoincAxes:
    component: str
    property: str = ""
    system: str = ""
    scale: str = ""                  # Qn | Ord | Nom | Nar | "" (inferred from the property)
    timing: str = ""


_ORD = {"presence", "titer", "interpretation", "susceptibility", "presence or identity"}
_NOM = {"identifier", "type", "prid"}
# Systems that say nothing about the specimen ("in Specimen", "in Isolate"): never a contradiction.
_GENERIC_SYSTEMS = {"specimen", "isolate", "unspecified specimen", "xxx"}
_SYSTEM_TAIL = re.compile(r"\s+(?:by\s.*|--.*)$|\s+(?:Narrative|Cyto stain|fine needle aspirate.*)$")


def loinc_axes(name: str) -> LoincAxes:
    """Component, property, system and scale of a LOINC long common name ("Potassium [Moles/volume] in Serum or
    Plasma", "pH of Arterial blood"); a name without brackets or system keeps only its component."""
    name = name.strip()
    prop, system = "", ""
    if "[" in name and "]" in name[name.index("["):]:
        i = name.index("[")
        j = name.index("]", i)
        component, prop, rest = name[:i].strip(), name[i + 1:j].strip(), name[j + 1:].strip()
        m = re.match(r"^(?:in|of|on)\s+(.+)$", rest)
        system = m.group(1) if m else ""
    else:
        m = re.match(r"^(.+?)\s+(?:in|of|on)\s+([A-Z0-9].*)$", name)  # the system is capitalised in LOINC names
        component, system = (m.group(1), m.group(2)) if m else (name, "")
    system = _SYSTEM_TAIL.sub("", system).strip()
    if system.lower() in _GENERIC_SYSTEMS:
        system = ""
    low, p = name.lower(), prop.lower()
    scale = ("Ord" if p in _ORD else "Nom" if p in _NOM else "Nar" if "narrative" in low or "report" in low
             else "Qn" if "/" in p or p in {"ratio", "mcnc", "scnc", "catc"} else "")
    timing = "24 hour" if system.lower().startswith("24 hour") else ""
    return LoincAxes(component=component, property=prop, system=system, scale=scale, timing=timing)


def _property_family(p: str) -> str:
    p = p.lower()
    return "time" if p.endswith("/time") else p.split("/")[0] if "/" in p else p


def match_features(lab: LabName, candidate_name: str) -> dict[str, float]:
    """How a candidate's LOINC axes agree with a lab name's hints: +1 agrees, -1 contradicts, 0 unknown, for the
    system (specimen), the scale, the property and the timing."""
    ax = loinc_axes(candidate_name)
    sys_l = ax.system.lower()
    system = 0.0
    if lab.specimen is not None and sys_l:
        system = 1.0 if sys_l in lab.specimen.systems or sys_l == lab.specimen.text.lower() else -1.0
    scale = 0.0
    if lab.scale and ax.scale:
        scale = 1.0 if lab.scale == ax.scale else -1.0
    prop = 0.0
    if lab.prop and ax.property:
        prop = 1.0 if _property_family(lab.prop) == _property_family(ax.property) else -1.0
    timing = 0.0
    if lab.specimen is not None and sys_l:
        timing = 1.0 if (lab.specimen.timing == "24 hour") == (ax.timing == "24 hour") else -1.0
    return {"lab_system": system, "lab_scale": scale, "lab_property": prop, "lab_timing": timing}
