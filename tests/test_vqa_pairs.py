"""easy-vqa-yesno-paired: complementary pairs (each yes/no training question also asked of an image with the
opposite answer), so the question's wording alone is worth half of its training answers."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from adapterkit.data.vqa_tasks import VQAExample, asked, complementary_pairs, image_attributes


def q(image, question, answer, qtype="yesno"):
    return VQAExample(image, question, answer, qtype, f"{image}#{question}")


def test_asked_reads_the_attribute_its_value_and_the_negation():
    assert asked("is there a red shape?") == ("colour", "red", False)
    assert asked("does the image not contain a circle?") == ("shape", "circle", True)
    assert asked("is no teal shape present?") == ("colour", "teal", True)
    with pytest.raises(ValueError, match=r"names no colour or shape: 'is it nice\?'"):
        asked("is it nice?")


def test_image_attributes_come_from_what_questions_and_from_yes_no_answers_that_name_them():
    rows = [q("a", "what color is the shape?", "red", "colour"),
            q("b", "is there not a circle?", "no"),            # b has a circle
            q("b", "is there a blue shape?", "yes"),          # b is blue
            q("c", "is there a green shape?", "no")]          # c is not green: colour unknown
    assert image_attributes(rows) == {"a": {"colour": "red"}, "b": {"shape": "circle", "colour": "blue"}}


def test_each_question_gets_a_partner_image_with_the_opposite_answer():
    attributes = {"r1": {"colour": "red"}, "r2": {"colour": "red"}, "b1": {"colour": "blue"},
                  "g1": {"colour": "green"}, "c1": {"shape": "circle"}}
    rows = [q("r1", "is there a red shape?", "yes"), q("b1", "is there a red shape?", "no"),
            q("g1", "is there not a red shape?", "yes"), q("r2", "is there not a red shape?", "no"),
            q("c1", "is there a triangle?", "no")]         # no image is known to hold a triangle: unpaired
    out = complementary_pairs(rows, attributes, "seed")
    assert out[:5] == rows and len(out) == 9
    for original, partner in zip(rows[:4], out[5:]):
        assert partner.question == original.question and partner.answer != original.answer
        kind, value, negated = asked(partner.question)
        assert (attributes[partner.image][kind] == value) == ((partner.answer == "yes") != negated)
    assert out[5].image != "r1" and out[6].image in ("r1", "r2")
    assert complementary_pairs(rows, attributes, "seed") == out       # seeded


@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="easy-vqa not installed")
def test_the_paired_task_balances_every_wording_and_keeps_validation_and_test():
    from adapterkit.data.tasks import load_task

    plain, paired = load_task("easy-vqa-yesno"), load_task("easy-vqa-yesno-paired")
    assert paired.validation == plain.validation and paired.test == plain.test
    assert len(paired.train) == 2 * len(plain.train) == 51062 and set(plain.train) <= set(paired.train)
    by_form = Counter((asked(e.question)[0], asked(e.question)[2], e.answer) for e in paired.train)
    for kind in ("colour", "shape"):
        for negated in (False, True):
            assert by_form[(kind, negated, "yes")] == by_form[(kind, negated, "no")]
    # in the package the wording answers 82 % (the colour questions 8 to 1): that is what pairs remove
    plain_form = Counter((asked(e.question)[0], asked(e.question)[2], e.answer) for e in plain.train)
    assert plain_form[("colour", False, "no")] > 6 * plain_form[("colour", False, "yes")]
    assert not {e.image for e in paired.train} & {e.image for e in paired.validation}
    assert "complementary pair" in paired.card["split_method"]
