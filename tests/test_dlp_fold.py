"""Full-width folding: only what can be part of a value, found alike by numpy and by re, and
offsets in the folded text mapped back to the text as written."""

import random
from pathlib import Path

from gateway.dlp import fold as folding, load_rules
from gateway.dlp.fold import fold

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "dlp"


def test_chinese_punctuation_is_not_folded_and_prose_not_copied():
    assert fold("　　正文，说明：（试行）；结束！“引号”。".encode()) is None
    assert fold("＂ａ＂".encode()).data == '＂a＂'.encode()  # a full-width quote is not JSON structure


def test_separators_fold_where_they_touch_a_digit_or_a_letter():
    assert fold("电话（０１０）－１２，　　下一段".encode()).data == "电话(010)-12，　　下一段".encode()
    assert fold("（ＧＤＰ）　　Ａ＋Ｂ".encode()).data == "(GDP)　 A+B".encode()
    outbound = load_rules(SHIPPED).profile("outbound")
    for text, kind in (("电话（010）62345678", "cn_landline"), ("手机 138　0013　8000", "cn_mobile")):
        assert kind in {f.type for f in outbound.scan(text.encode(), content_type="text/plain").findings}, text


def test_offsets_in_the_folded_text_map_back_to_the_text_as_written():
    text = "（Ａ）说明：１２，ab－3　。".encode()
    folded = fold(text)
    assert folded is not None
    for offset, byte in enumerate(folded.data):  # each ASCII letter or digit is itself or its full-width form
        if byte < 128 and chr(byte).isalnum():
            at = folded.unfolded(offset)
            assert text[at:at + 1] == bytes([byte]) or text[at:at + 3] == chr(byte + 0xFEE0).encode(), offset
    assert folded.unfolded(len(folded.data)) == len(text)


def test_c_numpy_and_re_fold_alike(monkeypatch):
    """The characters to fold are found in C, or without it by numpy in large texts (fold._fold_starts)
    and by the regex in small ones: the same, whatever comes first or last (a separator, a form, a cut
    character)."""
    rng = random.Random(18)
    alphabet = list("ab19 ,-(\n") + list("，：（）－＋．＠＿％　ＡＺａｚ０９。中")
    for _ in range(80):
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))).encode()
        end = rng.choice(alphabet).encode() + rng.choice([b"", b"\xef", b"\xef\xbc", b"\xe3\x80"])
        for data in (piece + end, piece * (folding._NUMPY_FOLD_FROM // len(piece) + 1) + end):
            monkeypatch.setattr(folding, "kernels", None)
            monkeypatch.setattr(folding, "_NUMPY_FOLD_FROM", 1 << 40)
            with_re = fold(data)
            monkeypatch.setattr(folding, "_NUMPY_FOLD_FROM", 0)
            assert fold(data) == with_re, ("numpy", piece.decode())
            monkeypatch.undo()
            if folding.kernels is not None:
                assert fold(data) == with_re, ("C", piece.decode())

