"""Why a text does or does not match: every detector candidate with the validation steps it went through."""

from dataclasses import dataclass

from gateway.dlp.fold import folded
from gateway.dlp.detectors import DETECTORS, MAX_TOKEN_BYTES
from gateway.dlp.matcher import PatternSpec, compile_re
from gateway.dlp.validators import Steps


@dataclass(frozen=True)
class Candidate:
    detector: str
    token: str
    start: int           # byte offset in the folded UTF-8 text
    whole_token: bool    # not glued to letters or digits around it
    steps: Steps

    @property
    def valid(self) -> bool:
        return self.whole_token and all(ok for _, ok in self.steps)


def explain(text: str) -> list[Candidate]:
    """Every candidate any built-in detector pattern finds in `text`, in text order."""
    data = folded(text.encode("utf-8", "surrogatepass"))
    candidates: dict[tuple[str, int, int], Candidate] = {}
    for detector in DETECTORS.values():
        for regex in detector.patterns:
            # without \b, so a number glued to others is shown and rejected, not silently skipped
            pattern = compile_re(PatternSpec(regex.replace(r"\b", "")))
            for match in pattern.finditer(data):
                start, end = match.start(), match.end()
                if detector.extend_left:
                    floor = max(start - MAX_TOKEN_BYTES, 0)
                    while start > floor and data[start - 1] in detector.extend_left:
                        start -= 1
                token = data[start:end].decode("utf-8", "replace")
                whole = (start == 0 or not chr(data[start - 1]).isalnum() or data[start - 1] >= 0x80) and \
                    (end == len(data) or not chr(data[end]).isalnum() or data[end] >= 0x80)
                candidates[(detector.name, start, end)] = Candidate(detector.name, token, start, whole,
                                                                    detector.check(token))
    return sorted(candidates.values(), key=lambda c: (c.start, c.detector))
