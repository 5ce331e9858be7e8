"""`mask_id_numbers`, alone: what the consent stage does to a response's header fields. Each ID number
it is told to mask is masked where it is written (full-width, lower-case x, beside other text), the
rest of the text is kept, and what it leaves names none of them as `id_numbers` reads it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.authz.idscan import id_numbers, mask_id_numbers

UNCONSENTED, CONSENTED = "520602198005018001", "52060219900101123X"
FULL_WIDTH = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")


def only_unconsented(numbers: set[str]) -> set[str]:
    return {number for number in numbers if number.upper() != CONSENTED}


def test_masked_where_written_the_rest_kept():
    text = f"家属 {UNCONSENTED.translate(FULL_WIDTH)}; 户主 {CONSENTED.lower()}, {UNCONSENTED}"
    assert mask_id_numbers(text, only_unconsented) == (
        f"家属 520602********8001; 户主 {CONSENTED.lower()}, 520602********8001", 2)
    assert mask_id_numbers("max-age=3600", only_unconsented) == ("max-age=3600", 0)
    # Longer digit runs are no ID number (as id_numbers reads them): kept.
    assert mask_id_numbers("1" + UNCONSENTED, only_unconsented) == ("1" + UNCONSENTED, 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=6), st.sampled_from([UNCONSENTED, UNCONSENTED.translate(FULL_WIDTH),
                                                                 CONSENTED, CONSENTED.translate(FULL_WIDTH)])),
                max_size=6))
def test_leaves_no_unconsented_number(pieces):
    text = "".join(pieces)
    masked, count = mask_id_numbers(text, only_unconsented)
    assert not only_unconsented(id_numbers([masked]))
    assert count >= len(only_unconsented(id_numbers([text])))  # (one number may stand twice)
    assert (count == 0) == (masked == text)
