"""Understanding scoring, MME score and the "5-scale max" against hand-computed values."""

import numpy as np
import pytest

from puma_jax.evaluation import scoring


def test_normalize_answer():
  assert scoring.normalize_answer("The Two dogs, 1.5 m!") == "2 dogs 1.5 m"
  assert scoring.normalize_answer("  It is RED. ") == "it is red"
  assert scoring.normalize_answer("an apple") == "apple"


def test_short_answer_exact_match_and_vqa_accuracy():
  assert scoring.short_answer_score("Two.", "2") == 1.0
  assert scoring.short_answer_score("three", "2") == 0.0
  # VQAv2: min(#matching references / 3, 1): 2 of 10 match -> 2/3; 4 match -> 1.
  refs = ["2", "two", "3", "3", "3", "4", "many", "3", "3", "3"]
  assert scoring.short_answer_score("2", refs) == pytest.approx(2 / 3)
  assert scoring.short_answer_score("3", refs) == 1.0
  assert scoring.short_answer_score("5", refs) == 0.0
  with pytest.raises(ValueError, match="no reference"):
    scoring.short_answer_score("2", [])


def test_choice_letter():
  opts = {"A": "red", "B": "a blue square", "C": "green"}
  cases = {
    "A": "A",
    "b.": "B",
    "(C)": "C",
    "B) a blue square": "B",
    "Answer: C": "C",
    "The answer is B": "B",
    "A blue square": "B",  # an article, not option A
    "red": "A",
    "D": None,
    "yes": None,
    "": None,
  }
  for text, want in cases.items():
    assert scoring.choice_letter(text, opts) == want, text
  assert scoring.multiple_choice_score("B.", opts, "b") == 1.0
  assert scoring.multiple_choice_score("purple", opts, "A") == 0.0


def test_yes_no():
  assert scoring.yes_no("Yes, it is.") == "yes"
  assert scoring.yes_no("no") == "no"
  assert scoring.yes_no("Maybe yes") == "other"


def test_mme_scores_by_hand():
  # color: image 1 both right, image 2 one right -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125.
  # count: image 3 both wrong, image 4 both right -> acc 50, acc+ 50 -> 100. total 225.
  items = [
    dict(category="color", image_id=1, correct=1),
    dict(category="color", image_id=1, correct=1),
    dict(category="color", image_id=2, correct=1),
    dict(category="color", image_id=2, correct=0),
    dict(category="count", image_id=3, correct=0),
    dict(category="count", image_id=3, correct=0),
    dict(category="count", image_id=4, correct=1),
    dict(category="count", image_id=4, correct=1),
  ]
  out = scoring.mme_scores(items)
  assert out["color/acc"] == 75.0 and out["color/acc_plus"] == 50.0 and out["color"] == 125.0
  assert out["count/acc"] == 50.0 and out["count/acc_plus"] == 50.0 and out["count"] == 100.0
  assert out["total"] == 225.0


def test_best_over_scales_by_hand():
  per_scale = {"f0": [0.1, 0.9, 0.5], "f1": [0.3, 0.2, 0.5], "f4": [0.2, 0.4, 0.7]}
  assert scoring.best_over_scales(per_scale) == [0.3, 0.9, 0.7]
  assert scoring.best_over_scales(per_scale, higher_is_better=False) == [0.1, 0.2, 0.5]
  # The mean of the per-example best is not the best of the per-scale means.
  assert np.mean([0.3, 0.9, 0.7]) > max(np.mean(v) for v in per_scale.values())


def test_llava_prompts():
  from puma_jax.evaluation import evaluators as E

  p = E.understanding_prompt(
    {"id": 0, "kind": "choice", "question": "Colour?", "options": {"A": "red", "B": "blue"}}
  )
  assert (
    p == "Colour?\nA. red\nB. blue\nAnswer with the option's letter from the given "
    "choices directly."
  )
  assert (
    E.understanding_prompt({"id": 0, "kind": "short", "question": "What? "})
    == "What?\nAnswer the question using a single word or phrase."
  )
  q = "Is it red? Please answer yes or no."
  assert E.understanding_prompt({"id": 0, "kind": "yes_no", "question": q}) == q


def test_synthetic_records():
  import ml_collections
  from puma_jax.data import synthetic
  from puma_jax.evaluation import records

  cfg = ml_collections.ConfigDict({"seed": 0, "size": 32, "num_train": 50, "num_items": 3})
  ed = records.synthetic_records("editing", cfg)
  assert len(ed) == 3 and all(r["target_caption"] != r["source_caption"] for r in ed)
  und = records.synthetic_records("understanding", cfg)
  assert [r["kind"] for r in und[:4]] == ["short", "choice", "yes_no", "yes_no"]
  yes, no = und[2], und[3]
  assert (yes["answer"], no["answer"]) == ("yes", "no") and yes["image_id"] == no["image_id"]
  assert und[1]["options"][und[1]["answer"]] in synthetic.BACKGROUNDS
  with pytest.raises(records.EvalDataError, match="unknown eval protocol"):
    records.synthetic_records("captioning", cfg)
