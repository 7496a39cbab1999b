"""Drug strings: ingredient, strength, dose form and brand, read with small tables into RxNorm's own word order.

Local drug strings say "Diazepam (Valium)", "glucose 40% syringe pump infusion", "salbutamol inhalation solution";
RxNorm and RxNorm Extension name the same products "diazepam Oral Tablet [Valium]", "Glucose 400 MG/ML Injection",
"Albuterol 1 MG/ML Inhalation Solution [Ventolin]". `parse_drug` pulls out the strength (converted to RxNorm's units:
a percentage is 10 MG/ML per percent), the dose form (the local words mapped to RxNorm's dose-form names), the brand
(a parenthesised name, RxNorm writes it in brackets) and leaves the ingredient; `DrugString.text` rewrites them in
RxNorm order ("Glucose 400 MG/ML Injectable Solution"). `match_features` compares a candidate's RxNorm name with them.

No drug-string library fits both the translated ICU strings and RxNorm's names without downloads (the
dictionary-based ones ship their own, English-only, lexicons); the tables are what the AmsterdamUMCdb drug set uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Local dose-form words -> RxNorm dose form. Longest first when matching, so "oral suspension" beats "suspension".
DOSE_FORMS: dict[str, str] = {
    "syringe pump infusion": "Injectable Solution", "piggyback infusion": "Injectable Solution",
    "pressure bag flush": "Injectable Solution", "flush": "Injectable Solution",
    "infusion": "Injectable Solution", "injection": "Injectable Solution", "inj": "Injectable Solution",
    "iv": "Injectable Solution", "i.v.": "Injectable Solution", "syringe pump": "Injectable Solution",
    "injectable": "Injectable Solution", "bolus": "Injectable Solution",
    "tablet": "Oral Tablet", "tablets": "Oral Tablet", "tab": "Oral Tablet", "capsule": "Oral Capsule",
    "capsules": "Oral Capsule", "caps": "Oral Capsule", "oral suspension": "Oral Suspension",
    "suspension": "Oral Suspension", "mixture": "Oral Solution", "drink": "Oral Solution", "syrup": "Oral Solution",
    "oral solution": "Oral Solution", "drank": "Oral Solution", "granules": "Granules for Oral Suspension",
    "sachet": "Powder for Oral Solution", "powder": "Powder for Oral Solution",
    "inhalation solution": "Inhalation Solution", "nebulizer": "Inhalation Solution", "nebule": "Inhalation Solution",
    "inhalation": "Inhalation Solution", "inhaler": "Metered Dose Inhaler", "aerosol": "Metered Dose Inhaler",
    "puff": "Metered Dose Inhaler", "nasal spray": "Nasal Spray", "spray": "Nasal Spray",
    "eye drops": "Ophthalmic Solution", "eye drop": "Ophthalmic Solution", "eye ointment": "Ophthalmic Ointment",
    "ear drops": "Otic Solution", "drops": "Oral Solution", "ointment": "Topical Ointment", "cream": "Topical Cream",
    "gel": "Topical Gel", "lotion": "Topical Lotion", "patch": "Transdermal System", "plaster": "Transdermal System",
    "suppository": "Rectal Suppository", "suppositories": "Rectal Suppository", "enema": "Enema",
    "rectal": "Rectal Suppository", "mouthwash": "Mouthwash", "oral": "Oral", "paste": "Oral Paste",
    "lozenge": "Oral Lozenge", "dispersible tablet": "Tablet for Oral Suspension",
    "effervescent tablet": "Effervescent Oral Tablet", "chewable tablet": "Chewable Tablet",
}
_FORM = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(DOSE_FORMS, key=len, reverse=True))
                   + r")(?![\w])", re.I)

# Strength: "40%", "0.9 %", "500 mg", "10mg/ml", "5 mg/5 ml", "1000 IE" (Dutch IE = IU).
_UNITS = {"mg": "MG", "g": "G", "gr": "G", "gram": "G", "mcg": "MCG", "µg": "MCG", "ug": "MCG", "microgram": "MCG",
          "ml": "ML", "l": "L", "ie": "UNT", "iu": "UNT", "e": "UNT", "units": "UNT", "unit": "UNT", "mmol": "MMOL",
          "meq": "MEQ"}
_STRENGTH = re.compile(
    r"(?<![\w.])(?P<num>\d+(?:[.,]\d+)?)\s*(?P<unit>%|mg|g|gr|gram|mcg|µg|ug|microgram|ml|ie|iu|units?|mmol|meq)"
    r"(?:\s*/\s*(?P<per_num>\d+(?:[.,]\d+)?)?\s*(?P<per>ml|l|g|dose|hr|h))?(?![\w])", re.I)
_PAREN = re.compile(r"\(([^()]*)\)")
# Parenthesised words that are no brand: routes, forms and generic remarks.
_NOT_BRAND = {"secondary", "primary", "contrast fluid", "oral", "iv", "extra", "other", "diverse", "vit k",
              "vitamin k", "children", "child", "adult", "premix", "prem", "clear", "tpn"}


def _num(s: str) -> float:
    return float(s.replace(",", "."))


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass
class DrugString:
    """What `parse_drug` read from a drug string."""

    original: str
    ingredient: str
    strength: str = ""           # RxNorm style: "400 MG/ML", "500 MG"
    dose_form: str = ""          # RxNorm dose form: "Injectable Solution"
    brand: str = ""
    hints: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.strength or self.dose_form or self.brand)

    @property
    def text(self) -> str:
        """RxNorm word order: "ingredient strength dose form [Brand]" (the parts that are known)."""
        if not self.changed:
            return self.original
        parts = [p for p in (self.ingredient, self.strength, self.dose_form) if p]
        if self.brand:
            parts.append(f"[{self.brand}]")
        return " ".join(parts)


def _strength(m: re.Match[str]) -> str:
    num, unit, per, per_num = m.group("num"), m.group("unit").lower(), m.group("per"), m.group("per_num")
    if unit == "%":  # w/v: 1% = 10 mg/ml
        return f"{_fmt(_num(num) * 10)} MG/ML"
    out = f"{_fmt(_num(num))} {_UNITS.get(unit, unit.upper())}"
    if per and per.lower() in ("ml", "l", "g"):
        amount = _num(per_num) if per_num else 1.0
        if amount != 1.0:  # "5 mg/5 ml" -> "1 MG/ML"
            return f"{_fmt(_num(num) / amount)} {_UNITS.get(unit, unit.upper())}/{per.upper()}"
        out += f"/{per.upper()}"
    return out


def parse_drug(text: str) -> DrugString:
    """Strength, dose form and brand of a drug string; what is left is the ingredient (as written)."""
    out = DrugString(original=text, ingredient=text.strip())
    rest = text.strip()
    # A brand: a parenthesised capitalised name that is not a route or remark ("Diazepam (Valium)").
    for pm in list(_PAREN.finditer(rest)):
        inner = pm.group(1).strip()
        if inner and inner[0].isupper() and inner.lower() not in _NOT_BRAND and not _STRENGTH.search(inner) \
                and not out.brand and len(inner) <= 40:
            out.brand = inner.split(",")[0].strip()
            out.hints.append(f"brand ({inner})")
            rest = rest[:pm.start()] + rest[pm.end():]
    rest = re.sub(r"\s*\((?:secondary|primary|\s*)\)", "", rest, flags=re.I)  # pump-line remarks
    sm = _STRENGTH.search(rest)
    if sm and sm.group("unit").lower() != "ml":  # "Water 200ml" is a volume, not a strength
        out.strength = _strength(sm)
        out.hints.append(f"strength {sm.group(0).strip()}")
        rest = rest[:sm.start()] + " " + rest[sm.end():]
    fm = _FORM.search(rest)
    if fm:
        out.dose_form = DOSE_FORMS[fm.group(1).lower()]
        out.hints.append(f"form {fm.group(1)}")
        rest = rest[:fm.start()] + " " + rest[fm.end():]
        # the rest of a form phrase ("syringe pump infusion (secondary)") says nothing about the ingredient
        rest = _FORM.sub(" ", rest)
    rest = re.sub(r"\(\s*\)", " ", rest)  # what a strength in parentheses left
    out.ingredient = re.sub(r"\s+", " ", rest).strip(" ,;-/") or text.strip()
    return out


# ------------------------------------------------------------------------------------------------ candidates

_RX_FORMS = sorted({v for v in DOSE_FORMS.values()} | {"Injection", "Prefilled Syringe", "Oral Product"}, key=len,
                   reverse=True)


def rxnorm_parts(name: str) -> DrugString:
    """Strength, dose form and brand of an RxNorm / RxNorm Extension name ("diazepam 5 MG Oral Tablet [Valium]")."""
    brand = ""
    m = re.search(r"\[([^\]]+)\]\s*$", name)
    rest = name
    if m:
        brand, rest = m.group(1).strip(), name[:m.start()].strip()
    form = next((f for f in _RX_FORMS if rest.lower().endswith(f.lower()) or f" {f.lower()} " in rest.lower()), "")
    # "500 ML Sodium Chloride 9 MG/ML ...": the leading quantity is the pack, the concentration the strength
    found = re.findall(r"\d+(?:\.\d+)?\s+(?:MG|G|MCG|UNT|MMOL|MEQ|ML)(?:/(?:ML|L|G|ACTUAT|HR))?", rest)
    strength = next((f for f in found if "/" in f), next((f for f in found if not f.endswith(" ML")), ""))
    return DrugString(original=name, ingredient=rest, strength=strength, dose_form=form, brand=brand)


def _form_family(form: str) -> str:
    f = form.lower()
    for word in ("inject", "oral", "inhal", "topical", "ophthalmic", "rectal", "nasal", "transdermal", "otic"):
        if word in f:
            return "oral" if word == "oral" or f in ("granules for oral suspension",) else word
    return f


def match_features(d: DrugString, candidate_name: str) -> dict[str, float]:
    """+1 agrees, -1 contradicts, 0 unknown: the candidate's strength, dose form and brand against the string's."""
    c = rxnorm_parts(candidate_name)
    strength = 0.0
    if d.strength and c.strength:
        strength = 1.0 if d.strength.replace(" ", "").upper() == c.strength.replace(" ", "").upper() else -1.0
    form = 0.0
    if d.dose_form and c.dose_form:
        form = 1.0 if _form_family(d.dose_form) == _form_family(c.dose_form) else -1.0
    brand = 0.0
    if d.brand and c.brand:
        # "Thalamonal (Droperidol)": local strings put the brand first as often as in parentheses
        names = (d.brand.lower(), d.ingredient.lower())
        brand = 1.0 if any(n and (n in c.brand.lower() or c.brand.lower() in n) for n in names) else -1.0
    return {"drug_strength": strength, "drug_form": form, "drug_brand": brand}
