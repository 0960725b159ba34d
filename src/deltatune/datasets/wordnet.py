"""WordNet 3.0 (Debian ``wordnet-base``): definitions as instruction data, and lexnames.

File formats (wndb(5WN)): a ``data.<pos>`` line is
``offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt pointers... [frames] | gloss``;
an ``index.<pos>`` line is
``lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offset...`` with the
offsets in order of sense frequency; ``cntlist.rev`` lines are
``sense_key sense_number tag_cnt`` (SemCor tag counts). A gloss is a definition followed
by example sentences in double quotes: ``a dog; "the dog barked all night"``. Lines that
start with two spaces are the licence header.

Three data sets:

- ``wordnet-definitions``: "Define the word X (noun)." -> the definition of X's most
  frequent sense, one row per (word, part of speech). Split by word: a held-out word
  never appears in train under any part of speech.
- ``wordnet-lexnames``: a synset's definition -> its lexicographer file (45 classes,
  lexnames(5WN)), one row per synset, stratified split.
- ``wordnet-term-spans``: sequence labelling with labels exact by construction. A gloss's
  example sentences illustrate the synset's words; where one of them occurs verbatim
  (same tokens, any case) in an example, the row is (query = that word, the sentence's
  tokens, BIO tags marking every occurrence, typed by the synset's part of speech:
  ``B-NOUN``/``I-NOUN``, ``-VERB``, ``-ADJ``, ``-ADV``). Inflected uses ("barked" for
  "bark") are not occurrences, so such examples are skipped. Split by word: a test word
  (and every sentence it tags) never appears in train.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from importlib import resources

from deltatune.core.errors import DataError
from deltatune.datasets import BuildContext, DatasetSpec, register
from deltatune.datasets._common import (
    BuildResult,
    Row,
    Source,
    SourceArchive,
    group_split,
    progress_iter,
    squash_spaces,
    stratified_split,
)

# lexnames(5WN): the lexicographer file names, indexed by file number (00-44).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
    "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
FILE_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}  # data/index file suffix -> pos
# ss_type digits used in sense keys (cntlist.rev): 5 is an adjective satellite.
SENSE_KEY_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}

SEED = 13
WORD_RE = re.compile(r"[a-z]+(?:-[a-z]+)*")
MAX_DEFINITION_WORDS = 30
DEFINITION_FRACTIONS = (0.9, 0.05, 0.05)
LEXNAME_FRACTIONS = (0.8, 0.1, 0.1)


def license_text() -> str:
    """The WordNet 3.0 licence, shipped with deltatune (it must accompany all copies)."""
    return (resources.files("deltatune.datasets") / "data" / "WORDNET-LICENSE.txt").read_text(
        encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class Synset:
    """One synset of a data file."""

    offset: str  # 8 digits, unique within its data file
    pos: str  # file part of speech: n, v, a (adjectives and satellites) or r
    ss_type: str  # n, v, a, s or r
    lexname: str
    words: tuple[str, ...]  # as written, underscores for spaces, syntactic markers removed
    definition: str
    examples: tuple[str, ...]

    @property
    def synset_id(self) -> str:
        """A stable id such as ``n02084071`` (pos letter + offset)."""
        return f"{self.pos}{self.offset}"


def _depth0_quotes(gloss: str) -> list[int]:
    """Positions of double quotes outside parentheses."""
    depth, out = 0, []
    for i, ch in enumerate(gloss):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == '"' and depth == 0:
            out.append(i)
    return out


_ONLY_QUOTES = re.compile(r'(\s*"[^"]*"\s*[;:,.]?)+\s*')


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """Split a gloss into (definition, example sentences).

    The examples start at the first double quote outside parentheses that follows a
    ``;`` or ``:`` (WordNet's usual separator), or a ``,`` when only quoted text follows;
    quotes inside the definition (``as in "carrot and stick"``) stay. Returns the
    definition without trailing punctuation and the examples unquoted.
    """
    gloss = squash_spaces(gloss)
    cut = None
    for pos in _depth0_quotes(gloss):
        before = gloss[:pos].rstrip()
        if before.endswith((";", ":")) or (
                before.endswith(",") and _ONLY_QUOTES.fullmatch(gloss[pos:])):
            cut = pos
            break
    if cut is None:
        return gloss.rstrip(" ;:"), ()
    definition = gloss[:cut].rstrip().rstrip(";:,").rstrip()
    examples = tuple(e.strip() for e in re.findall(r'"([^"]*)"', gloss[cut:]) if e.strip())
    return definition, examples


def parse_data_line(line: str, file_pos: str) -> Synset | None:
    """Parse one line of ``data.<pos>``; return None for licence-header lines."""
    if not line.strip() or line.startswith(" "):
        return None
    head, sep, gloss = line.partition(" | ")
    if not sep:  # a synset without a gloss has a trailing "|"
        head, gloss = line.rstrip().rstrip("|"), ""
    fields = head.split()
    try:
        offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
        w_cnt = int(fields[3], 16)
        words = tuple(re.sub(r"\((a|p|ip)\)$", "", w) for w in fields[4:4 + 2 * w_cnt:2])
        lexname = LEXNAMES[lex_filenum]
    except (IndexError, ValueError) as exc:
        raise DataError(f"data.{file_pos}: malformed synset line ({exc}): {line[:80]!r}") from None
    if ss_type not in POS_NAMES or len(words) != w_cnt:
        raise DataError(f"data.{file_pos}: malformed synset line: {line[:80]!r}")
    definition, examples = split_gloss(gloss)
    return Synset(offset, file_pos, ss_type, lexname, words, definition, examples)


def parse_index_line(line: str) -> tuple[str, str, tuple[str, ...]] | None:
    """Parse one line of ``index.<pos>``: (lemma, pos, synset offsets by frequency).

    Returns None for licence-header lines.
    """
    if not line.strip() or line.startswith(" "):
        return None
    fields = line.split()
    try:
        lemma, pos, synset_cnt = fields[0], fields[1], int(fields[2])
    except (IndexError, ValueError):
        raise DataError(f"index: malformed line: {line[:80]!r}") from None
    offsets = tuple(fields[-synset_cnt:])
    if len(offsets) != synset_cnt or not all(o.isdigit() for o in offsets):
        raise DataError(f"index: malformed line: {line[:80]!r}")
    return lemma, pos, offsets


def parse_cntlist(text: str) -> Counter[tuple[str, str]]:
    """Sum the SemCor tag counts of ``cntlist.rev`` per (lemma, pos)."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or "%" not in parts[0]:
            continue
        lemma, _, rest = parts[0].partition("%")
        pos = SENSE_KEY_POS.get(rest[:1])
        if pos is not None:
            counts[(lemma.lower(), pos)] += int(parts[2])
    return counts


@dataclasses.dataclass
class WordNet:
    """The parts of WordNet the builders use."""

    synsets: dict[tuple[str, str], Synset]  # (file pos, offset) -> synset
    index: dict[tuple[str, str], tuple[str, ...]]  # (lemma, pos) -> offsets by frequency
    counts: Counter[tuple[str, str]]  # (lemma, pos) -> SemCor tag count


def read_wordnet(archive: SourceArchive, progress: bool = False) -> WordNet:
    """Parse data.*, index.* and cntlist.rev out of a wordnet-base .deb (or any archive
    holding WordNet 3.0's dict files)."""
    files = archive.read_many(r"(^|/)((data|index)\.(noun|verb|adj|adv)|cntlist\.rev)$")
    by_base = {name.rsplit("/", 1)[-1]: raw for name, raw in files.items()}
    missing = [f"{k}.{p}" for k in ("data", "index") for p in FILE_POS if f"{k}.{p}" not in by_base]
    if missing:
        raise DataError(f"{archive.path.name}: WordNet files missing: {', '.join(missing)}")
    synsets: dict[tuple[str, str], Synset] = {}
    index: dict[tuple[str, str], tuple[str, ...]] = {}
    for suffix, pos in FILE_POS.items():
        lines = by_base[f"data.{suffix}"].decode("utf-8").splitlines()
        for line in progress_iter(lines, progress, f"data.{suffix}"):
            synset = parse_data_line(line, pos)
            if synset is not None:
                synsets[(pos, synset.offset)] = synset
        for line in by_base[f"index.{suffix}"].decode("utf-8").splitlines():
            entry = parse_index_line(line)
            if entry is not None:
                index[(entry[0], pos)] = entry[2]
    counts = parse_cntlist(by_base["cntlist.rev"].decode("utf-8")) \
        if "cntlist.rev" in by_base else Counter()
    return WordNet(synsets, index, counts)


def definition_rows(wn: WordNet) -> tuple[list[Row], dict[str, int]]:
    """One instruction row per (word, pos) that passes the filters; also the drop counts.

    Filters (in this order): the lemma is one lowercase word of letters, hyphens allowed
    (drops collocations like ``ice_cream``, and words with digits, dots or apostrophes);
    at least 2 letters; the most frequent sense is not a proper noun (its form in the
    synset is capitalised); its definition has 1..30 words.
    """
    rows: list[Row] = []
    dropped: Counter[str] = Counter()
    for (lemma, pos), offsets in sorted(wn.index.items()):
        if "_" in lemma:
            dropped["multi-word collocation"] += 1
            continue
        if not WORD_RE.fullmatch(lemma):
            dropped["not a plain lowercase word (digits, dots, apostrophes...)"] += 1
            continue
        if len(lemma) < 2:
            dropped["single letter"] += 1
            continue
        senses = [wn.synsets[(pos, off)] for off in offsets if (pos, off) in wn.synsets]
        if not senses:
            dropped["no synset"] += 1
            continue
        first = senses[0]
        form = next((w for w in first.words if w.lower() == lemma), lemma)
        if form != lemma:
            dropped["proper noun or capitalised form"] += 1
            continue
        n_words = len(first.definition.split())
        if n_words == 0:
            dropped["empty definition"] += 1
            continue
        if n_words > MAX_DEFINITION_WORDS:
            dropped[f"definition longer than {MAX_DEFINITION_WORDS} words"] += 1
            continue
        pos_name = POS_NAMES[first.ss_type]
        references = list(dict.fromkeys(s.definition for s in senses if s.definition))
        rows.append({
            "prompt": f"Define the word {lemma} ({pos_name}).",
            "response": first.definition,
            "word": lemma, "pos": pos_name, "lexname": first.lexname,
            "synset": first.synset_id, "senses": len(senses),
            "frequency": wn.counts.get((lemma, pos), 0),
            "examples": list(first.examples), "references": references,
        })
    return rows, dict(sorted(dropped.items()))


def lexname_rows(wn: WordNet) -> tuple[list[Row], dict[str, int]]:
    """One classification row per synset with a definition: text -> lexicographer file."""
    rows, dropped = [], Counter()
    for key in sorted(wn.synsets):
        s = wn.synsets[key]
        if not s.definition:
            dropped["empty definition"] += 1
            continue
        rows.append({"text": s.definition, "label": s.lexname, "pos": POS_NAMES[s.ss_type],
                     "words": [w.replace("_", " ") for w in s.words],
                     "examples": list(s.examples), "synset": s.synset_id})
    return rows, dict(dropped)


# Tokens of a sentence: words with inner apostrophes, dots or hyphens ("don't", "U.S",
# "well-known") stay whole; any other non-space character is a token of its own.
TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:['.-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")
SPAN_TYPES = {"n": "NOUN", "v": "VERB", "a": "ADJ", "s": "ADJ", "r": "ADV"}
TERM_TAGS = ("O", *(f"{b}-{t}" for t in ("NOUN", "VERB", "ADJ", "ADV") for b in "BI"))
TERM_FRACTIONS = (0.8, 0.1, 0.1)


def tokenize(text: str) -> list[str]:
    """Split a sentence into the tokens the tagging rows use (:data:`TOKEN_RE`)."""
    return TOKEN_RE.findall(text)


def tag_occurrences(tokens: Sequence[str], term: Sequence[str], span_type: str
                    ) -> list[str] | None:
    """BIO tags marking every occurrence of the token sequence ``term`` in ``tokens``.

    Matching ignores case; occurrences are taken left to right without overlap. Returns
    None when ``term`` does not occur.
    """
    low = [t.lower() for t in tokens]
    want = [t.lower() for t in term]
    tags = ["O"] * len(tokens)
    found, i = False, 0
    while want and i + len(want) <= len(low):
        if low[i:i + len(want)] == want:
            tags[i] = f"B-{span_type}"
            for j in range(i + 1, i + len(want)):
                tags[j] = f"I-{span_type}"
            found = True
            i += len(want)
        else:
            i += 1
    return tags if found else None


def term_span_rows(wn: WordNet) -> tuple[list[Row], dict[str, int]]:
    """One tagging row per (synset, example sentence, synset word occurring in it).

    Rows with the same query and tokens (any case) are kept once when their tags agree;
    when they disagree (one sentence illustrating the word as two parts of speech) all of
    them are dropped, since no single tagging is right. Returns rows and drop counts.
    """
    candidates: dict[tuple[str, tuple[str, ...]], list[Row]] = {}
    dropped: Counter[str] = Counter()
    for key in sorted(wn.synsets):
        s = wn.synsets[key]
        for example in s.examples:
            tokens = tokenize(example)
            hit = False
            for word in dict.fromkeys(w.replace("_", " ") for w in s.words):
                term = tokenize(word)
                if not term or not any(ch.isalnum() for ch in word):
                    continue
                tags = tag_occurrences(tokens, term, SPAN_TYPES[s.ss_type])
                if tags is None:
                    continue
                hit = True
                row = {"query": word, "tokens": tokens, "tags": tags,
                       "pos": POS_NAMES[s.ss_type], "lexname": s.lexname,
                       "synset": s.synset_id, "example": example}
                ident = (word.lower(), tuple(t.lower() for t in tokens))
                candidates.setdefault(ident, []).append(row)
            if not hit:
                dropped["no synset word occurs verbatim in the example"] += 1
    rows: list[Row] = []
    for group in candidates.values():
        if len({tuple(r["tags"]) for r in group}) > 1:
            dropped["same word and sentence tagged differently by two synsets"] += len(group)
            continue
        if len(group) > 1:
            dropped["duplicate (same word, same sentence, same tags)"] += len(group) - 1
        rows.append(group[0])
    return rows, dict(sorted(dropped.items()))


def _linked_groups(rows: Sequence[Row]) -> list[str]:
    """A group id per row such that rows sharing a word or a sentence share a group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rows:
        a = find("w:" + r["query"].lower())
        b = find("s:" + " ".join(r["tokens"]).lower())
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find("w:" + r["query"].lower()) for r in rows]


SOURCE = Source("debian", "wordnet-base", "",
                ("usr/share/wordnet/data.{noun,verb,adj,adv}",
                 "usr/share/wordnet/index.{noun,verb,adj,adv}", "usr/share/wordnet/cntlist.rev"))
LICENCE = "WordNet 3.0 licence (permissive; the notice must accompany every copy)"
CITATION = ("Princeton University \"About WordNet.\" WordNet. Princeton University. 2010. "
            "George A. Miller (1995). WordNet: A Lexical Database for English. "
            "Communications of the ACM 38(11): 39-41.")


def build_definitions(ctx: BuildContext) -> BuildResult:
    """Builder of ``wordnet-definitions``."""
    wn = read_wordnet(ctx.archive(), ctx.progress)
    rows, dropped = definition_rows(wn)
    splits = group_split(rows, group=lambda r: r["word"],
                         key=lambda r: f"{r['word']}|{r['pos']}", seed=SEED,
                         fractions=DEFINITION_FRACTIONS)
    words = {s: len({r["word"] for r in rs}) for s, rs in splits.items()}
    return BuildResult(splits=splits, build={
        "task": "causal-LM instruction tuning: prompt -> response (definition of the most "
                "frequent sense, WordNet style: lowercase, no final period)",
        "unit": "one row per (word, part of speech) from index.<pos>; the response is the "
                "definition of the first (most frequent) sense, without example sentences",
        "filters": [
            "lemma is one lowercase word of letters with optional inner hyphens: "
            "collocations with underscores, digits, dots and apostrophes are skipped",
            "lemma has at least 2 letters",
            "the first sense's word form is lowercase (proper nouns are skipped)",
            f"the definition has 1 to {MAX_DEFINITION_WORDS} words",
        ],
        "dropped": dropped,
        "split": f"by word, 90/5/5: words in sha256(seed, word) order fill validation, then "
                 f"test, then train (seed {SEED}); every part of speech of a held-out word is "
                 f"held out",
        "seed": SEED, "words_per_split": words,
        "fields": {"prompt": "instruction", "response": "target definition",
                   "word": "the lemma", "pos": "noun/verb/adjective/adverb",
                   "lexname": "lexicographer file of the first sense",
                   "synset": "pos letter + data-file offset of the first sense",
                   "senses": "number of senses of the word in this part of speech",
                   "frequency": "SemCor tag count of the word in this part of speech "
                                "(cntlist.rev); 0 = untagged",
                   "examples": "example sentences of the first sense",
                   "references": "definitions of all senses, most frequent first (for "
                                 "multi-reference ROUGE)"},
    })


def build_lexnames(ctx: BuildContext) -> BuildResult:
    """Builder of ``wordnet-lexnames``."""
    wn = read_wordnet(ctx.archive(), ctx.progress)
    rows, dropped = lexname_rows(wn)
    splits = stratified_split(rows, key=lambda r: r["synset"], label=lambda r: r["label"],
                              seed=SEED, fractions=LEXNAME_FRACTIONS)
    present = {r["label"] for r in rows}
    return BuildResult(splits=splits, label_names=[n for n in LEXNAMES if n in present], build={
        "task": "45-way classification: synset definition -> lexicographer file (lexnames(5WN))",
        "unit": "one row per synset of data.{noun,verb,adj,adv}; text = the definition "
                "without example sentences (they are in the 'examples' field; append them "
                "for an easier task)",
        "filters": ["synsets with an empty definition are skipped"], "dropped": dropped,
        "split": f"stratified by label, 80/10/10, order by sha256(seed, synset id) (seed "
                 f"{SEED})",
        "seed": SEED,
        "label_order": "lexicographer file number (00 adj.all ... 44 adj.ppl)",
        "fields": {"text": "definition", "label": "lexicographer file name",
                   "pos": "part of speech", "words": "the synset's words",
                   "examples": "example sentences", "synset": "pos letter + offset"},
    })


def build_term_spans(ctx: BuildContext) -> BuildResult:
    """Builder of ``wordnet-term-spans``."""
    wn = read_wordnet(ctx.archive(), ctx.progress)
    rows, dropped = term_span_rows(wn)
    for row, group in zip(rows, _linked_groups(rows)):
        row["group"] = group
    splits = group_split(rows, group=lambda r: r["group"],
                         key=lambda r: f"{r['synset']}|{r['query']}|{r['example']}", seed=SEED,
                         fractions=TERM_FRACTIONS)
    for split_rows in splits.values():
        for row in split_rows:
            del row["group"]
    spans = {s: sum(t.startswith("B-") for r in rs for t in r["tags"])
             for s, rs in splits.items()}
    return BuildResult(splits=splits, build={
        "task": "sequence labelling (BIO): given a query word and a WordNet example "
                "sentence, tag every verbatim occurrence of the word, typed by the part of "
                "speech it has in that synset (NOUN, VERB, ADJ, ADV)",
        "labels_exact_by_construction": "tags come from string matching of the synset's own "
                                        "words in its own example sentences, not from a "
                                        "tagger or annotators",
        "unit": "one row per (synset, example sentence, synset word occurring verbatim in "
                "it); multi-word synset words (collocations) give multi-token spans",
        "tokenizer": f"regex {TOKEN_RE.pattern!r} on the example and on the word",
        "tag_set": list(TERM_TAGS),
        "filters": ["examples where no synset word occurs verbatim (case-insensitive) are "
                    "skipped: inflected uses are not occurrences",
                    "a (word, sentence) pair tagged differently by two synsets is dropped"],
        "dropped": dropped, "spans": spans,
        "split": f"by word, 80/10/10, groups in sha256(seed, group) order fill validation, "
                 f"then test, then train (seed {SEED}); a group joins words that tag the same "
                 f"sentence, so held-out words and held-out sentences are both unseen in "
                 f"train",
        "seed": SEED,
        "fields": {"query": "the synset word to find (spaces for underscores)",
                   "tokens": "the example sentence's tokens", "tags": "BIO tag per token",
                   "pos": "part of speech of the synset", "lexname": "lexicographer file",
                   "synset": "pos letter + offset", "example": "the example sentence"},
    })


register(DatasetSpec(
    name="wordnet-definitions", kind="sft",
    description="WordNet 3.0 definitions as instructions: 'Define the word X (noun).' -> the "
                "definition of its most frequent sense; split by word",
    source=SOURCE, licence=LICENCE, notice=license_text(), builder=build_definitions,
    citation=CITATION))
register(DatasetSpec(
    name="wordnet-lexnames", kind="classification",
    description="WordNet 3.0 synset definitions -> lexicographer class (45 classes such as "
                "noun.animal, verb.motion)",
    source=SOURCE, licence=LICENCE, notice=license_text(), builder=build_lexnames,
    citation=CITATION))

register(DatasetSpec(
    name="wordnet-term-spans", kind="tagging",
    description="WordNet 3.0 example sentences: tag the query word's occurrences as BIO spans "
                "typed by part of speech (labels exact by construction); split by word",
    source=SOURCE, licence=LICENCE, notice=license_text(), builder=build_term_spans,
    citation=CITATION))
