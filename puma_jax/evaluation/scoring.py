"""Answer scoring for the understanding benchmarks and the per-example "5-scale max".

short answers   VQAv2 / GQA style: both sides normalized (`normalize_answer`: lower case,
                punctuation and articles dropped, number words to digits, spaces collapsed),
                then exact match; with several reference answers (VQAv2's ten) the VQA
                accuracy min(#matching references / 3, 1).
multiple choice MMBench style: the option letter is read from the answer (`choice_letter`) and
                compared with the correct letter; an answer naming no option is wrong.
yes / no        MME style: the answer's leading yes/no (`yes_no`); per category
                accuracy = % questions right, accuracy+ = % images with *both* questions right,
                category score = accuracy + accuracy+, total = the sum over categories.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence

_NUMBERS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Keep a decimal point between digits ("1.5"); every other punctuation mark becomes a space.
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))[" + re.escape(string.punctuation) + "]")


def normalize_answer(s: str) -> str:
  s = _PUNCT.sub(" ", str(s).lower().replace("\n", " "))
  words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
  return " ".join(words)


def short_answer_score(prediction: str, answers: str | Sequence[str]) -> float:
  """1/0 exact match against one answer; VQA accuracy against a list of references."""
  pred = normalize_answer(prediction)
  if isinstance(answers, str):
    return float(pred == normalize_answer(answers))
  if len(answers) == 0:
    raise ValueError("short_answer_score: no reference answers")
  hits = sum(pred == normalize_answer(a) for a in answers)
  return float(min(hits / 3.0, 1.0)) if len(answers) > 1 else float(hits)


def choice_letter(prediction: str, options: Mapping[str, str]) -> str | None:
  """The option letter an answer names: "B", "B.", "(B)", "B) text", "Answer: B", "The answer
  is B"; or else the one option whose text the answer equals after normalization. "A red
  circle" is read as text, not as option A (a letter needs punctuation or nothing after it).
  None when undecidable."""
  letters = {k.strip().upper() for k in options}
  text = re.sub(
    r"^(?:the\s+)?answer(?:\s+is)?\s*:?\s*", "", str(prediction).strip(), flags=re.IGNORECASE
  )
  m = re.match(r"^\(?([A-Za-z])(?:\)|[.:,]|$)", text)
  if m and m.group(1).upper() in letters:
    return m.group(1).upper()
  norm = normalize_answer(text)
  hits = [k.strip().upper() for k, v in options.items() if normalize_answer(v) == norm]
  return hits[0] if len(hits) == 1 else None


def multiple_choice_score(prediction: str, options: Mapping[str, str], answer: str) -> float:
  return float(choice_letter(prediction, options) == str(answer).strip().upper())


def yes_no(prediction: str) -> str:
  """ "yes", "no" or "other" from an answer's first word (MME's parsing)."""
  words = normalize_answer(prediction).split()
  first = words[0] if words else ""
  return first if first in ("yes", "no") else "other"


def mme_scores(items: Sequence[Mapping]) -> dict[str, float]:
  """`items`: dicts with category, image_id and correct (0/1). -> {category: acc + acc+,
  "total": sum of the category scores, "<category>/acc", "<category>/acc_plus"}."""
  by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  for it in items:
    by_cat[str(it["category"])][str(it["image_id"])].append(float(it["correct"]))
  out, total = {}, 0.0
  for cat in sorted(by_cat):
    images = by_cat[cat]
    answers = [c for cs in images.values() for c in cs]
    acc = 100.0 * sum(answers) / len(answers)
    acc_plus = 100.0 * sum(all(c == 1.0 for c in cs) for cs in images.values()) / len(images)
    out[f"{cat}/acc"], out[f"{cat}/acc_plus"] = acc, acc_plus
    out[cat] = acc + acc_plus
    total += acc + acc_plus
  out["total"] = total
  return out


def best_over_scales(per_scale: Mapping[str, Sequence[float]], higher_is_better: bool = True):
  """The paper's "5-scale max": for each example the best value over the scales (an oracle
  that picks the scale per example), as a list aligned with the inputs."""
  rows = list(zip(*per_scale.values()))
  pick = max if higher_is_better else min
  return [float(pick(r)) for r in rows]
