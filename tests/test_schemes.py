"""Scheme strings (docs/DESIGN.md, Folding and the first step): validation, folding, per-letter deltas, draws, first step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from thermo_ext.schemes import LETTERS, NAMED, FoldedScheme, fold, is_valid


def letters(folded_or_program):
    seq = folded_or_program.letters if isinstance(folded_or_program, FoldedScheme) \
        else folded_or_program
    return "".join(x.letter for x in seq)


def needs_one_gradient(s: str) -> bool:
    """The folding rule (docs/DESIGN.md), written independently: some rotation starts with B and has no B after
    any A; equivalently, the B and the A letters of the cycle form one run each."""
    ab = [ch for ch in s if ch in "AB"]
    runs = sum(1 for i in range(len(ab)) if ab[i] != ab[i - 1])  # cyclic letter changes
    return "A" in ab and "B" in ab and runs == 2


# ---------------------------------------------------------------------------------------------
# Folding results (docs/DESIGN.md, Folding and the first step)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written,folded", [
    ("BAOAB", "B·BAOA"),
    ("OBABO", "BO·OBA"),
    ("ABOBA", "BOBAA"),
    ("BACDEDCAB", "B·BACDEDCA"),
    ("BA", "BA"),
    ("AB", "B·A"),  # the B after the last A is the previous step's: skipped on the first
    ("BAO", "BAO"),
    ("OBA", "BAO"),
    ("BAAB", "B·BAA"),
    ("ABBA", "BBAA"),
])
def test_fold_strings(written, folded):
    f = fold(written)
    assert str(f) == folded
    assert f.written == written


def test_fold_of_oba_has_no_tail():
    # "OBA" rotates by one to "BAO": the O came from *before* the first B, not from after the
    # last A, so nothing is skipped on the first step.
    f = fold("OBA")
    assert f.n_tail == 0 and letters(f.program(True)) == "BAO"


@pytest.mark.parametrize("name,written,folded", [
    ("langevin", "BAOAB", "B·BAOA"),
    ("adl", "BACDEDCAB", "B·BACDEDCA"),
])
def test_named_schemes(name, written, folded):
    f = fold(name)
    assert f.name == name and f.written == written and str(f) == folded
    assert not f.overdamped and f.uses_momentum


def test_named_overdamped():
    f = fold("overdamped")
    assert f.name == "overdamped" and f.overdamped and not f.uses_momentum
    assert not f.uses_thermostat and f.n_draws == 1
    for first in (True, False):
        (x,) = f.program(first)
        assert x.letter == "V" and x.factor == 1.0 and x.draw == 0


@pytest.mark.parametrize("spelling", ["baoab", "BaOaB", " BAOAB ", "Langevin", "LANGEVIN",
                                      " langevin"])
def test_case_insensitive(spelling):
    assert str(fold(spelling)) == "B·BAOA"


def test_case_insensitive_named_others():
    assert str(fold("ADL")) == str(fold("adl")) == "B·BACDEDCA"
    assert fold("OverDamped").overdamped
    assert str(fold("obabo")) == "BO·OBA"


# ---------------------------------------------------------------------------------------------
# Deltas, draws, tails, merging, xi versions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written", ["BAOAB", "OBABO", "ABOBA", "BACDEDCAB", "BAOCDEAB",
                                     "BBAOOAE", "BEACDC"])
def test_per_letter_factor_is_one_over_count(written):
    f = fold(written)
    for x in f.letters:
        assert x.factor == pytest.approx(1.0 / written.count(x.letter), rel=0, abs=1e-15)
    # every letter's factors add up to one step: h per letter kind
    for ch in set(written):
        assert sum(x.factor for x in f.letters if x.letter == ch) == pytest.approx(1.0)


def test_baoab_letters():
    f = fold("BAOAB")
    got = [(x.letter, x.factor, x.draw, x.tail) for x in f.letters]
    assert got == [("B", 0.5, None, True), ("B", 0.5, None, False), ("A", 0.5, None, False),
                   ("O", 1.0, 0, False), ("A", 0.5, None, False)]
    assert f.n_tail == 1 and f.n_draws == 1 and f.n_e == 0 and not f.uses_thermostat


def test_obabo_draw_numbering():
    # "BO·OBA": the tail's O is draw 0, the other O draw 1, also on the first step
    f = fold("OBABO")
    got = [(x.letter, x.factor, x.draw, x.tail) for x in f.letters]
    assert got == [("B", 0.5, None, True), ("O", 0.5, 0, True), ("O", 0.5, 1, False),
                   ("B", 0.5, None, False), ("A", 1.0, None, False)]
    first = f.program(True)
    assert [(x.letter, x.factor, x.draw) for x in first] == [("O", 0.5, 1), ("B", 0.5, None),
                                                            ("A", 1.0, None)]
    later = f.program(False)
    assert [(x.letter, x.factor, x.draw) for x in later] == [
        ("B", 0.5, None), ("O", 0.5, 0), ("O", 0.5, 1), ("B", 0.5, None), ("A", 1.0, None)]


def test_draws_number_o_and_d_in_folded_order():
    f = fold("BACDEDCAB")
    assert [(x.letter, x.draw) for x in f.letters if x.draw is not None] == [("D", 0), ("D", 1)]
    f = fold("OBDAODB")
    assert str(f) == "B·OBDAOD"
    noisy = [x for x in f.letters if x.letter in "OD"]
    assert [x.draw for x in noisy] == list(range(len(noisy)))
    assert all(x.draw is None for x in f.letters if x.letter not in "OD")


def test_first_step_drops_the_tail_and_merges_b_only_later():
    f = fold("BAOAB")
    first = f.program(True)
    later = f.program(False)
    assert [(x.letter, x.factor) for x in first] == [("B", 0.5), ("A", 0.5), ("O", 1.0),
                                                     ("A", 0.5)]
    # B(h/2) B(h/2) -> B(h) on later steps only
    assert [(x.letter, x.factor) for x in later] == [("B", 1.0), ("A", 0.5), ("O", 1.0),
                                                     ("A", 0.5)]
    assert all(not x.tail for x in first + later)


def test_adl_program():
    f = fold("adl")
    first = f.program(True)
    later = f.program(False)
    assert letters(first) == "BACDEDCA" and letters(later) == "BACDEDCA"
    assert first[0].factor == 0.5 and later[0].factor == 1.0
    assert [x.factor for x in later[1:]] == [0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5]
    cs = [x.xi_version for x in later if x.letter == "C"]
    assert cs == [0, 1]
    assert f.n_e == 1 and f.uses_thermostat and f.n_draws == 2


def test_aboba_merges_the_two_a_on_every_step():
    f = fold("ABOBA")
    assert f.n_tail == 0
    for first in (True, False):
        assert [(x.letter, x.factor) for x in f.program(first)] == [
            ("B", 0.5), ("O", 1.0), ("B", 0.5), ("A", 1.0)]


def test_merges_c_but_not_o_d_e():
    f = fold("BACCAOODDEE")  # no tail: the written string already starts with B
    prog = f.program(False)
    assert letters(prog) == "BACAOODDEE"
    c = [x for x in prog if x.letter == "C"]
    assert len(c) == 1 and c[0].factor == 1.0
    assert [x.draw for x in prog if x.letter in "OD"] == [0, 1, 2, 3]


def test_xi_version_counts_the_e_executed_before_c():
    # "BACBEB" folds to "BEB·BAC": on the first step the tail (with its E) is skipped, so the C
    # sees xi version 0; later steps run the E first and the C sees version 1.
    f = fold("BACBEB")
    assert str(f) == "BEB·BAC"
    (c_first,) = [x for x in f.program(True) if x.letter == "C"]
    (c_later,) = [x for x in f.program(False) if x.letter == "C"]
    assert c_first.xi_version == 0 and c_later.xi_version == 1
    # two E: versions 0, 1, 2
    f = fold("BACECECAB")
    assert [x.xi_version for x in f.program(False) if x.letter == "C"] == [0, 1, 2]
    assert f.n_e == 2
    assert all(x.factor == 0.5 for x in f.letters if x.letter == "E")


def test_describe_and_repr_mention_the_fold():
    f = fold("OBABO")
    text = f.describe()
    assert "BO·OBA" in text and "first step" in text and "later steps" in text
    assert "OBABO" in repr(f) and "BO·OBA" in repr(f)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_string(bad):
    with pytest.raises(ValueError, match="empty"):
        fold(bad)


@pytest.mark.parametrize("bad,letter", [("BAXAB", "X"), ("BAOAB1", "1"), ("BA-B", "-"),
                                        ("langevn", "L"), ("BA AB", " ")])
def test_unknown_letter_is_named(bad, letter):
    with pytest.raises(ValueError, match="unknown letter") as e:
        fold(bad)
    assert repr(letter) in str(e.value)


@pytest.mark.parametrize("bad", ["A", "AOA", "AAO", "ACDEDCA", "O"])
def test_no_b(bad):
    with pytest.raises(ValueError, match="no B"):
        fold(bad)


@pytest.mark.parametrize("bad", ["B", "BOB", "BBO", "BCDEDCB", "EB"])
def test_no_a(bad):
    with pytest.raises(ValueError, match="no A"):
        fold(bad)


@pytest.mark.parametrize("bad", ["BABA", "ABAB", "BAOBAO", "BABOA", "BAOBOA", "OBAOBA",
                                 "BACBAC", "ABAAB", "BBAABA"])
def test_two_gradients_per_step(bad):
    assert not needs_one_gradient(bad)
    with pytest.raises(ValueError, match="two gradients"):
        fold(bad)


@pytest.mark.parametrize("good", ["BAAB", "ABBA", "BBAA", "AABB", "OAAOBO",
                                  "BOOAA", "ABOBA", "BAOAB", "OBABO"])
def test_one_gradient_per_step(good):
    assert needs_one_gradient(good)
    f = fold(good)
    s = str(f).replace("·", "")
    assert s[0] == "B" and "B" not in s[s.index("A"):]


@pytest.mark.parametrize("bad", [None, 1, b"BAOAB", ["B", "A"], 3.5])
def test_non_str_is_type_error(bad):
    with pytest.raises(TypeError, match="scheme"):
        fold(bad)
    assert not is_valid(bad)


def test_too_long():
    with pytest.raises(ValueError, match="at most"):
        fold("BA" + "O" * 40)


def test_is_valid():
    assert is_valid("BAOAB") and is_valid("adl") and is_valid("overdamped")
    assert not is_valid("BABA") and not is_valid("") and not is_valid("XYZ")


def test_named_table():
    assert NAMED["langevin"] == "BAOAB" and NAMED["adl"] == "BACDEDCAB"
    assert "overdamped" in NAMED and set(LETTERS) == set("ABOCDE")


# ---------------------------------------------------------------------------------------------
# Property: fold either rejects or returns a valid rotation
# ---------------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ABOCDE", min_size=1, max_size=14))
def test_fold_property(s):
    try:
        f = fold(s)
    except ValueError:
        assert not ("A" in s and "B" in s and needs_one_gradient(s))
        return
    assert "A" in s and "B" in s and needs_one_gradient(s)
    out = str(f)
    flat = out.replace("·", "")
    assert flat == letters(f)
    assert len(flat) == len(s) and flat in s + s  # a rotation of the input
    assert flat[0] == "B"
    assert "B" not in flat[flat.index("A"):]
    # the tail is exactly what the rotation took from after the last A of the written string
    if f.n_tail:
        head, rest = out.split("·")
        assert s.endswith(head) and "A" not in head and rest == s[: len(s) - len(head)]
        for ch in set(s):  # the first step runs exactly the letters after the "·"
            assert sum(x.factor for x in f.program(True) if x.letter == ch) == pytest.approx(
                rest.count(ch) / s.count(ch))
    else:
        assert "·" not in out
    # the first step drops the tail; merges only join equal neighbours of A, B, C
    first, later = f.program(True), f.program(False)
    assert sum(x.factor for x in later if x.letter == "B") == pytest.approx(1.0)
    assert sum(x.factor for x in later if x.letter == "A") == pytest.approx(1.0)
    assert sum(x.factor for x in first if x.letter == "A") == pytest.approx(1.0)
    for prog in (first, later):
        for a, b in zip(prog, prog[1:]):
            assert not (a.letter == b.letter and a.letter in "ABC")
        n_e = 0
        for x in prog:
            if x.letter == "C":
                assert x.xi_version == n_e
            n_e += x.letter == "E"
    draws = [x.draw for x in f.letters if x.draw is not None]
    assert draws == list(range(s.count("O") + s.count("D")))
