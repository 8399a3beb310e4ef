"""VQA answer matching: the normalization and per-question accuracy of the reference
scorers (LLaVA's m4c evaluator, the VQA API, LLaVA's GQA conversion) and cdx's own rule.

  normalize_answer("The Two Dogs.")            -> "2 dogs"
  vqa_soft_accuracy("two", ["2"] * 3 + ["3"] * 7) -> 0.9   (min(0.3 * #matches, 1))
  exact_match("Yes.", "yes")                   -> 1.0

docs/EVALUATION.md describes every step of every rule; the defaults are the references.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

# Answer normalization. Three rules (docs/EVALUATION.md describes each step):
#   "m4c"      LLaVA's m4c evaluator (EvalAI's answer processor): the default.
#   "vqa_api"  the VQA API's evaluation script (prediction side; see vqa_soft_accuracy).
#   "cdx"      a cleaner variant kept as an option (no possessive split, whitespace
#              collapsed first, a generated contraction table without false friends).
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                 "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Marks that are deleted (when used as punctuation) or turned into a space (inside a word);
# apostrophes, colons and periods are not among them.
_MARKS = ";/[]\"{}()=+\\_-><@`,?!"
_M4C_THOUSANDS = re.compile(r"(?<=\d),+(?=\d)")   # never fires in m4c: commas are gone first
_API_THOUSANDS = re.compile(r"\d,\d")
# A period not followed by a digit. The reference passes re.UNICODE (= 32) where `count`
# goes, so at most the first 32 such periods are removed; so do we.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32

# The reference contraction table as "full form: spellings that map to it". Its quirks are
# kept: "somebody'd" maps to "somebodyd"; capitalized keys (Im, Ive, Id've) can never match
# because words are lower-cased first.
_REFERENCE_CONTRACTIONS = """\
ain't: aint
aren't: arent
can't: cant
could've: couldve
couldn't: couldnt
couldn't've: couldn'tve couldnt've
didn't: didnt
doesn't: doesnt
don't: dont
hadn't: hadnt
hadn't've: hadnt've hadn'tve
hasn't: hasnt
haven't: havent
he'd: hed
he'd've: hed've he'dve
he's: hes
how'd: howd
how'll: howll
how's: hows
I'd've: Id've I'dve
I'm: Im
I've: Ive
isn't: isnt
it'd: itd
it'd've: itd've it'dve
it'll: itll
let's: let's
ma'am: maam
mightn't: mightnt
mightn't've: mightnt've mightn'tve
might've: mightve
mustn't: mustnt
must've: mustve
needn't: neednt
not've: notve
o'clock: oclock
oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat
shan't: shant
she'd've: shed've she'dve
she's: she's
should've: shouldve
shouldn't: shouldnt
shouldn't've: shouldnt've shouldn'tve
somebodyd: somebody'd
somebody'd've: somebodyd've somebody'dve
somebody'll: somebodyll
somebody's: somebodys
someone'd: someoned
someone'd've: someoned've someone'dve
someone'll: someonell
someone's: someones
something'd: somethingd
something'd've: somethingd've something'dve
something'll: somethingll
that's: thats
there'd: thered
there'd've: thered've there'dve
there're: therere
there's: theres
they'd: theyd
they'd've: theyd've they'dve
they'll: theyll
they're: theyre
they've: theyve
'twas: twas
wasn't: wasnt
we'd've: wed've we'dve
we've: weve
weren't: werent
what'll: whatll
what're: whatre
what's: whats
what've: whatve
when's: whens
where'd: whered
where's: wheres
where've: whereve
who'd: whod
who'd've: whod've who'dve
who'll: wholl
who's: whos
who've: whove
why'll: whyll
why're: whyre
why's: whys
won't: wont
would've: wouldve
wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve
y'all: yall
y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve
you'd: youd
you'd've: youd've you'dve
you'll: youll
you're: youre
you've: youve
"""
_REFERENCE_CONTRACTION_MAP = {
    spelling: full
    for line in _REFERENCE_CONTRACTIONS.splitlines()
    for full, spellings in [line.split(": ", 1)]
    for spelling in spellings.split()}


def _strip_marks(text: str, thousands: re.Pattern) -> str:
  """The reference punctuation rule. Every mark is deleted when the text shows it used as
  punctuation (a space on either side of it anywhere) or holds a thousands separator
  (`thousands` matches); otherwise it becomes a space ("t-shirt" -> "t shirt"). The tests
  look at the text as given, so the order of the marks does not matter. Then periods not
  followed by a digit go ("e.g." -> "eg", "3.5" stays)."""
  delete_all = thousands.search(text) is not None
  out = text
  for mark in _MARKS:
    if delete_all or f"{mark} " in text or f" {mark}" in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _digits_and_articles(text: str) -> str:
  """Lower-case words; number words -> digits; drop a/an/the; then contractions."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_REFERENCE_CONTRACTION_MAP.get(w, w) for w in words)


def _normalize_m4c(answer: str) -> str:
  """LLaVA's m4c evaluator (EvalAI's answer processor), used for predictions and human
  answers alike. Before the punctuation rule it lower-cases, deletes every "," and "?"
  ("1,000" -> "1000", "hello,world" -> "helloworld") and splits possessives
  ("dog's" -> "dog 's")."""
  text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _digits_and_articles(_strip_marks(text, _M4C_THOUSANDS))


def _normalize_vqa_api(answer: str) -> str:
  """The VQA API's processing of a prediction (no comma deletion, no possessive split;
  a "d,d" anywhere deletes every mark)."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  return _digits_and_articles(_strip_marks(text, _API_THOUSANDS))


# cdx's own rule: any spelling of a contraction missing one or more of its apostrophes is
# restored, except forms whose apostrophe-less spelling is an ordinary word (its, ill,
# well, were, shed, ...).
_CDX_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't",
    "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've",
    "he's", "how'd", "how'll", "how's", "i'd've", "i'm", "i've", "isn't", "it'd",
    "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "shan't", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've",
    "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's",
    "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll",
    "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
    "you're", "you've")


def _cdx_contraction_map() -> dict[str, str]:
  """{spelling with some apostrophes missing: full contraction}."""
  out = {}
  for word in _CDX_CONTRACTIONS:
    parts = word.split("'")
    for kept in itertools.product((True, False), repeat=len(parts) - 1):
      if all(kept):
        continue
      spelled = parts[0] + "".join(("'" if k else "") + p for k, p in zip(kept, parts[1:]))
      out[spelled] = word
  return out


_CDX_CONTRACTION_MAP = _cdx_contraction_map()


def _normalize_cdx(answer: str) -> str:
  """cdx's rule: whitespace collapsed first, the reference punctuation rule, number words,
  articles, then the generated contraction table; "'s" stays attached."""
  text = _strip_marks(" ".join(answer.lower().split()), _API_THOUSANDS)
  words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
  return " ".join(_CDX_CONTRACTION_MAP.get(w, w) for w in words if w not in _ARTICLES)


_NORMALIZERS = {"m4c": _normalize_m4c, "vqa_api": _normalize_vqa_api, "cdx": _normalize_cdx}
SOFT_RULES = tuple(_NORMALIZERS)
EXACT_RULES = ("gqa", "cdx")


def check_rule(rule: str, rules: Sequence[str], what: str) -> None:
  """Raises a clear error for a rule name not in `rules`."""
  if rule not in rules:
    raise ValueError(f"{what} rule={rule!r}; use one of {list(rules)} (the first is the "
                     "reference).")


def normalize_answer(answer: str, rule: str = "m4c") -> str:
  """A VQA answer as the rule compares it, e.g. "The Two Dogs." -> "2 dogs".

  rule: "m4c" (LLaVA / EvalAI, the default), "vqa_api" (the VQA API's prediction side)
  or "cdx"; docs/EVALUATION.md lists how they differ.
  """
  check_rule(rule, SOFT_RULES, "normalize_answer")
  return _NORMALIZERS[rule](answer)


def _leave_one_out(pred: str, gold: Sequence[str]) -> float:
  """Mean over the leave-one-out subsets of min(#matches among the others / 3, 1).

  For 10 answers this is min(0.3 * #matches, 1). Summed in the answers' order, as the
  references do, so the float is bit-identical.
  """
  hits = sum(g == pred for g in gold)
  accs = [min(1, (hits - (g == pred)) / 3) for g in gold]
  return sum(accs) / len(accs)


def vqa_soft_accuracy(pred: str, answers: Sequence[str], rule: str = "m4c") -> float:
  """Soft VQA accuracy of one reply against the human answers.

  "m4c" (LLaVA's TextVQA evaluator, the default): reply and every human answer through
  the m4c normalization; exactly 10 human answers (the reference asserts it).
  "vqa_api" (the VQA API's vqaEval.py): the reply fully normalized; the human answers
  only through the punctuation rule, and only when they are not all identical.
  "cdx": the cdx normalization on both sides, any number of answers.
  """
  check_rule(rule, SOFT_RULES, "vqa_soft_accuracy")
  if not answers:
    raise ValueError("vqa_soft_accuracy needs at least one human answer; got none.")
  answers = list(answers)
  if rule == "m4c":
    if len(answers) != 10:
      raise ValueError(f"rule='m4c' needs exactly 10 human answers per question (LLaVA's "
                       f"evaluator asserts it); got {len(answers)}. Use rule='cdx' for "
                       "other counts.")
    return _leave_one_out(_normalize_m4c(pred), [_normalize_m4c(a) for a in answers])
  if rule == "vqa_api":
    gold = answers
    if len(set(answers)) > 1:
      gold = [_strip_marks(a, _API_THOUSANDS) for a in answers]
    return _leave_one_out(_normalize_vqa_api(pred), gold)
  return _leave_one_out(_normalize_cdx(pred), [_normalize_cdx(a) for a in answers])


def exact_match(pred: str, answer: str, rule: str = "gqa") -> float:
  """1.0 if the reply is the answer, else 0.0.

  "gqa" (the default): LLaVA's GQA conversion (trailing periods stripped, lower-cased)
  then GQA's eval.py, which compares with the answer as given ("Left" never matches).
  "cdx": both sides lower-cased, whitespace collapsed, one final period dropped.
  """
  check_rule(rule, EXACT_RULES, "exact_match")
  if rule == "gqa":
    return float(pred.strip().rstrip(".").lower() == answer)

  def clean(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".").strip()
  return float(clean(pred) == clean(answer))


