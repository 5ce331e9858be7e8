"""Bulk exports as a city moves them: citizen records, each with a valid ID number, for DLP tests."""

from __future__ import annotations

import json
import random

from gateway.dlp.validators import id_card_check_char

REGIONS = ("110105", "310104", "440305", "330106", "510107", "420102")
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
STREETS = ("中山路", "人民大道", "解放西路", "建设街", "长江东路", "和平里")


def id_number(rng: random.Random) -> str:
    first17 = (rng.choice(REGIONS) + f"{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
               + f"{rng.randint(0, 999):03d}")
    return first17 + id_card_check_char(first17)


def citizens(count: int, seed: int = 18) -> list[dict]:
    """Records of name, ID number and an address written with full-width punctuation."""
    rng = random.Random(seed)
    return [{"name": rng.choice(SURNAMES) + rng.choice(SURNAMES) + "某",
             "sfzh": id_number(rng),
             "address": f"{rng.choice(STREETS)}{rng.randint(1, 999)}号，{rng.randint(1, 30)}栋（东），"
                        f"{rng.randint(101, 2505)}室，邮编：{rng.randint(100000, 999999)}。"}
            for _ in range(count)]


def citizens_json(count: int, seed: int = 18) -> bytes:
    return json.dumps(citizens(count, seed), ensure_ascii=False).encode()


def id_places(body: bytes, people: list[dict]) -> list[tuple[str, int]]:
    """Where each person's ID number is in a JSON export of them (tally places: the text, its byte offset)."""
    places, at = [], 0
    for person in people:
        at = body.index(person["sfzh"].encode(), at)
        places.append(("body", at))
        at += 1
    return places
