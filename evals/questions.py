"""The yes/no questions asked about an image, from the parts of a prompt: an object (a noun), an
attribute (an adjective of it) and a relation (a prepositional phrase of it), as DSG and
TIFA split a prompt into atoms, plus one for the whole combination.

    questions(Combo("circle", "red", "on the left of the image"))
    -> [("object", "Is there a circle in the image?"), ("attribute", "Is the circle red?"),
        ("relation", "Is the circle on the left of the image?"),
        ("combination", "Is there a red circle on the left of the image?")]

A prompt counts as drawn when every one of its questions is answered yes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Combo:
    """One object with one attribute and one relation (either may be empty)."""

    object: str
    attribute: str = ""
    relation: str = ""

    def phrase(self) -> str:
        """'red circle on the left of the image'."""
        return " ".join(x for x in (self.attribute, self.object, self.relation) if x)


CATEGORIES = ("object", "attribute", "relation", "combination")


def object_question(obj: str) -> str:
    return f"Is there a {obj} in the image?"


def attribute_question(obj: str, attribute: str) -> str:
    return f"Is the {obj} {attribute}?"


def relation_question(obj: str, relation: str) -> str:
    return f"Is the {obj} {relation}?"


def combination_question(combo: Combo) -> str:
    return f"Is there a {combo.phrase()}?"


def questions(combo: Combo) -> list[tuple[str, str]]:
    """(category, question) for each part the combo has, then the whole combination."""
    out = [("object", object_question(combo.object))]
    if combo.attribute:
        out.append(("attribute", attribute_question(combo.object, combo.attribute)))
    if combo.relation:
        out.append(("relation", relation_question(combo.object, combo.relation)))
    if combo.attribute or combo.relation:
        out.append(("combination", combination_question(combo)))
    return out
