"""Scores of the official E2E NLG Challenge evaluation (tuetschek/e2e-metrics), in Python.

Each function scores a corpus: ``hyps[i]`` is one raw (untokenized) system output and ``refs[i]``
its references, any number of them (E2E groups references by MR: 1 to ~45 each). Values are
unrounded (the official script prints 4 decimals) and on the official scale: BLEU, METEOR and
ROUGE-L in 0..1, NIST and CIDEr unbounded. Reading the data (grouping CSV rows by MR) is the
caller's job.

What each score follows -- e2e-metrics' measure_scores.py runs the Perl mteval-v13a-sig.pl for
BLEU/NIST and its copy of the MS-COCO caption evaluator (pycocoevalcap) for the rest:

* ``bleu``: mteval's corpus BLEU-4 from summed statistics. Text: NIST "13a" tokenization and,
  as e2e-metrics passes no ``-c``, lowercasing (ASCII letters only: Perl ``tr/[A-Z]/[a-z]/``).
  Per segment the closest reference length (ties: the shorter; empty references skipped).
  mteval's default BLEU is *smoothed*: the k-th n-gram order with no match counts 1/2^k rather
  than zeroing the score, an order the hypotheses are too short to have counts as 1.
  0..1 like the official output (TGen baseline 0.6593), not sacrebleu's 0..100; equal to
  ``sacrebleu.corpus_bleu(tokenize='13a', lowercase=True, smooth_method='none').score / 100``
  for ASCII text where every order has a match.
* ``nist``: mteval's NIST-5, information weights from all references of the corpus.
  e2e-metrics pads each MR with empty references up to the largest count, so the average
  reference length in the length penalty is (reference words) / (max #refs); kept.
* ``rouge_l``: pycocoevalcap Rouge: LCS F-measure with beta 1.2 built from the best precision
  and the best recall over the references (not the best F), averaged over items.
* ``cider``: pycocoevalcap Cider, i.e. CIDEr-D: n=4, sigma=6, clipped counts, x10, idf from the
  references of this corpus (so a one-item corpus scores 0), its "length" being the bigram
  count as in the original code.
* ``meteor``: meteor-1.5.jar ``-l en -norm`` over pycocoevalcap's stdio protocol; the corpus
  score is the jar's aggregate of summed statistics.
  ROUGE-L, CIDEr and METEOR see text tokenized by Stanford CoreNLP 3.4.1's PTBTokenizer
  (``-preserveLines -lowerCase``) with pycocoevalcap's punctuation tokens removed.

What differs: ``ptb_tokenize`` re-implements that Java tokenizer with regexes. On the 51,426
E2E train/dev/test references it yields the Java tokens for all but 3 (a kept period after a
final initial; commas between words, as ``french,family-friendly``, that Java does not split).
As in the original, ``(`` ``)`` become ``-lrb-`` ``-rrb-`` and stay (the removal list is upper
case) and ``£`` becomes ``#``. METEOR needs Java and the jar that the ``pycocoevalcap`` PyPI
package ships (found without importing it); without them ``meteor`` raises MetricUnavailable. The
JVM is started once per process and kept for later calls (as pycocoevalcap keeps it).
mteval's SGML entity decoding is applied to the raw text, as e2e-metrics writes it unescaped.
Checked against the Perl scoring subroutines and pycocoevalcap (Java tokenizer included) on
the E2E test set with a held-out reference as hypothesis: all five agree to 1e-12.
"""
from __future__ import annotations

import atexit
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from typing import Sequence

__all__ = ["MetricUnavailable", "bleu", "nist", "rouge_l", "cider", "meteor", "e2e_scores",
           "mteval_tokenize", "ptb_tokenize"]


class MetricUnavailable(RuntimeError):
    """A metric needs something this machine lacks (e.g. Java for METEOR)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _check(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if isinstance(hyps, str) or len(hyps) != len(refs):
        raise ValueError(f"need one list of references per hypothesis ({len(hyps)} vs {len(refs)})")
    if not hyps:
        raise ValueError("empty corpus")
    for i, r in enumerate(refs):
        if isinstance(r, str) or len(r) == 0:
            raise ValueError(f"item {i}: references must be a non-empty list of strings")


def _ngrams(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                   for i in range(len(words) - n + 1))


# ----------------------------------------------------------------------------- mteval-v13a

_UPPER_ASCII = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a ``tokenization`` (default, not international), lowercasing as without ``-c``."""
    s = re.sub(r"\s+", " ", text)  # the SGML reader joins all whitespace first
    s = s.replace("<skipped>", "")
    s = s.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    s = " " + s.translate(_UPPER_ASCII) + " "  # Perl tr/// touches ASCII letters only
    s = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", s)
    s = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", s)
    s = re.sub(r"([\.,])([^0-9])", r" \1 \2", s)
    s = re.sub(r"([0-9])(-)", r"\1 \2 ", s)
    return s.split()


def _closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    # brevity_penalty_closest: the first reference seeds it, later empty ones are skipped,
    # ties go to the shorter reference.
    best = ref_lens[0]
    for r in ref_lens[1:]:
        if r and (abs(hyp_len - r), r) < (abs(hyp_len - best), best):
            best = r
    return best


def _mteval_stats(hyps, refs, max_n: int):
    """Per-corpus sums of score_segment's outputs, n-gram orders 1..max_n."""
    hyp_toks = [mteval_tokenize(h) for h in hyps]
    ref_toks = [[mteval_tokenize(r) for r in rs] for rs in refs]
    match, tst_cnt, tst_info = [0] * (max_n + 1), [0] * (max_n + 1), [0.0] * (max_n + 1)
    ref_len = ref_words = 0
    info = _nist_info(ref_toks, max_n)
    for hyp, rs in zip(hyp_toks, ref_toks):
        ref_max: Counter = Counter()
        for r in rs:
            ref_max |= _ngrams(r, max_n)  # | keeps the max count of each n-gram
            ref_words += len(r)
        ref_len += _closest_ref_len(len(hyp), [len(r) for r in rs])
        for n in range(1, max_n + 1):
            tst_cnt[n] += max(len(hyp) - n + 1, 0)
        for ng, c in _ngrams(hyp, max_n).items():
            m = min(c, ref_max.get(ng, 0))
            if m:
                match[len(ng)] += m
                tst_info[len(ng)] += info[ng] * m
    return {"match": match, "tst": tst_cnt, "info": tst_info, "ref_len": ref_len,
            "ref_words": ref_words, "n_ref_sets": max(len(rs) for rs in refs)}


def _nist_info(ref_toks, max_n: int) -> dict:
    # compute_ngram_info: info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all
    # references; unigrams use the total word count.
    counts: Counter = Counter()
    total = 0
    for rs in ref_toks:
        for r in rs:
            total += len(r)
            counts.update(_ngrams(r, max_n))
    info = {}
    for ng, c in counts.items():
        prefix = ng[:-1]
        # Perl tests the prefix string for truth, and the string "0" is false there.
        denom = counts[prefix] if prefix and prefix != ("0",) else total
        info[ng] = -math.log(c / denom) / math.log(2)
    return info


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 of mteval-v13a as run by e2e-metrics, in 0..1 (see module docstring)."""
    _check(hyps, refs)
    st = _mteval_stats(hyps, refs, 4)
    tst, match = st["tst"], st["match"]
    if tst[1] == 0:  # all hypotheses empty: the script's length factor is 0
        return 0.0
    log_sum, smooth = 0.0, 1
    for n in range(1, 5):
        if tst[n] == 0:
            continue  # counts as log(1)
        if match[n] == 0:
            smooth *= 2
            log_sum += math.log(1.0 / (smooth * tst[n]))
        else:
            log_sum += math.log(match[n] / tst[n])
    return math.exp(log_sum / 4) * math.exp(min(0.0, 1.0 - st["ref_len"] / tst[1]))


def nist(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus NIST-5 of mteval-v13a as run by e2e-metrics."""
    _check(hyps, refs)
    st = _mteval_stats(hyps, refs, 5)
    if st["ref_words"] == 0:
        raise ValueError("the references contain no words")
    score = sum(st["info"][n] / max(st["tst"][n], 1) for n in range(1, 6))
    return score * _nist_length_penalty(st["tst"][1] / (st["ref_words"] / st["n_ref_sets"]))


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1 or ratio <= 0:
        return 1.0 if ratio >= 1 else 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)  # penalty 0.5 at ratio 1/1.5
    return math.exp(-beta * math.log(ratio) ** 2)


# ----------------------------------------------------------------------------- PTB tokenizer

# pycocoevalcap's list; compared with the *lowercased* tokens, so the bracket names never match.
_COCO_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
               ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
# Words whose final period the PTB lexer keeps (only those seen in E2E-like text matter).
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "rd", "ave", "jr", "sr", "prof", "etc", "inc", "ltd",
           "co", "corp", "vs", "mt", "ft", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
           "sep", "sept", "oct", "nov", "dec"}
_SPECIAL = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
            "wanna": ["wan", "na"], "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_GLUED_PERIOD = "\ue000"  # stands for a period the lexer leaves on its word (as in "center.,")


def ptb_tokenize(text: str) -> str:
    """Stanford PTBTokenizer (-lowerCase) + pycocoevalcap's punctuation removal, re-implemented."""
    s = text.replace("&amp;", "&")
    s = re.sub("[\u201c\u201d]", '"', s).replace("\u2019", "'").replace("\u2018", " ` ")
    s = re.sub("[\u2013\u2014]", " -- ", s).replace("\u2026", " ... ")
    s = s.replace(".,", _GLUED_PERIOD + " ,")
    s = re.sub(r"([A-Za-z])\.(\d)", r"\1 .\2", s)
    s = re.sub(r"(\d)\.([A-Za-z])", r"\1 . \2", s)
    s = re.sub(r'([;!?"()\[\]{}&$£€¥#%])', r" \1 ", s)
    s = re.sub(r"(\d)\+", r"\1 + ", s)
    s = re.sub(r"(\.\.\.|--)", r" \1 ", s)
    s = re.sub(r"(?<!\d),|,(?!\d)", " , ", s)  # keep 1,000
    s = re.sub(r"(?<!\d):(?!//)|:(?!\d|//)", " : ", s)  # keep 10:30 and http://
    toks = []
    for chunk in s.split():
        toks.extend(_split_chunk(chunk))
    out = []
    for t in toks:
        t = _BRACKETS.get(t, t).replace("£", "#").replace("€", "$").replace(_GLUED_PERIOD, ".")
        t = "''" if t == '"' else t.lower()
        if t not in _COCO_PUNCT:
            out.append(t)
    return " ".join(out)


def _split_chunk(tok: str) -> list[str]:
    """Split one whitespace-free chunk: leading/trailing punctuation, periods, clitics."""
    pre, post = [], []
    while True:  # leading punctuation; "-25" and ".5" stay numbers, "'s"/"'90s" stay words
        m = re.match(r"^(\.\.\.|--|[\"`(\[{$#£€¥]|-(?!\d)|\.(?!\d))", tok)
        if m and len(tok) > len(m.group(1)):
            pre.append(m.group(1))
            tok = tok[len(m.group(1)):]
        elif (tok.startswith("'") and len(tok) > 1
              and not re.match(r"^'(s|re|ve|ll|d|m|t|tis|twas|\d\ds)$", tok, re.I)):
            pre.append("`")
            tok = tok[1:]
        else:
            break
    while len(tok) > 1:  # trailing punctuation, then a sentence period unless an abbreviation
        m = re.search(r"(\.\.\.|--|''|[\",;:!?)\]}%'-])$", tok)
        if m and len(tok) > len(m.group(1)):
            post.insert(0, m.group(1))
            tok = tok[:-len(m.group(1))]
        elif (tok.endswith(".") and tok[:-1].lower() not in _ABBREV
              and not re.fullmatch(r"([A-Za-z]\.)+[A-Za-z]\.", tok)):
            post.insert(0, ".")
            tok = tok[:-1]
        else:
            break
    return pre + (_split_clitics(tok) if tok else []) + post


def _split_clitics(tok: str) -> list[str]:
    if tok.lower() in _SPECIAL:
        return list(_SPECIAL[tok.lower()])
    m = re.match(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", tok, re.I)
    if m:
        return _split_clitics(m.group(1)) + [m.group(2)]
    return [tok]


# ----------------------------------------------------------------------------- pycocoevalcap

def _coco_inputs(hyps, refs):
    return [ptb_tokenize(h) for h in hyps], [[ptb_tokenize(r) for r in rs] for rs in refs]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap Rouge (ROUGE-L F, beta=1.2) averaged over items, in 0..1."""
    _check(hyps, refs)
    beta2 = 1.2 ** 2
    hyp_t, ref_t = _coco_inputs(hyps, refs)
    total = 0.0
    for h, rs in zip(hyp_t, ref_t):
        hw = h.split(" ")  # split(" ") as pycocoevalcap: "" is one (empty) token
        prec = rec = 0.0
        for r in rs:
            rw = r.split(" ")
            lcs = _lcs(rw, hw)
            prec, rec = max(prec, lcs / len(hw)), max(rec, lcs / len(rw))
        if prec and rec:
            total += (1 + beta2) * prec * rec / (rec + beta2 * prec)
    return total / len(hyps)


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap Cider (CIDEr-D: n=4, sigma=6, clipped, x10) with idf from these references."""
    _check(hyps, refs)
    hyp_t, ref_t = _coco_inputs(hyps, refs)
    hyp_c = [_ngrams(h.split(), 4) for h in hyp_t]
    ref_c = [[_ngrams(r.split(), 4) for r in rs] for rs in ref_t]
    df: Counter = Counter()
    for rs in ref_c:
        df.update(set().union(*rs))
    log_n = math.log(len(hyps))
    total = 0.0
    for h, rs in zip(hyp_c, ref_c):
        vh = _cider_vec(h, df, log_n)
        sims = [0.0] * 4
        for r in rs:
            for n, s in enumerate(_cider_sim(vh, _cider_vec(r, df, log_n))):
                sims[n] += s
        total += sum(sims) / 4 / len(rs) * 10.0
    return total / len(hyps)


def _cider_vec(counts: Counter, df: Counter, log_n: float):
    vec = [dict() for _ in range(4)]
    norm = [0.0] * 4
    length = 0
    for ng, tf in counts.items():
        n = len(ng) - 1
        w = tf * (log_n - math.log(max(1.0, df[ng])))
        vec[n][ng] = w
        norm[n] += w * w
        if n == 1:  # sic: the original counts bigrams as the "length"
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _cider_sim(hyp, ref) -> list[float]:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    penalty = math.exp(-((lh - lr) ** 2) / (2 * 6.0 ** 2))
    out = []
    for n in range(4):
        val = sum(min(w, vr[n].get(ng, 0.0)) * vr[n].get(ng, 0.0) for ng, w in vh[n].items())
        if nh[n] != 0 and nr[n] != 0:
            val /= nh[n] * nr[n]
        out.append(val * penalty)
    return out


def _meteor_jar() -> str:
    """meteor-1.5.jar from the pycocoevalcap package, located without importing it."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        jar = os.path.join(d, "meteor", "meteor-1.5.jar")
        if os.path.isfile(jar) and os.path.isfile(
                os.path.join(d, "meteor", "data", "paraphrase-en.gz")):
            return jar
    raise MetricUnavailable("METEOR 1.5 needs meteor-1.5.jar and its paraphrase table "
                            "(pip install pycocoevalcap); not found")


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """METEOR 1.5 (Java jar, ``-l en -norm``) as pycocoevalcap runs it; corpus score in 0..1.

    Raises MetricUnavailable when Java or the jar is missing or the JVM fails.
    """
    _check(hyps, refs)
    jar = _meteor_jar()
    java = shutil.which("java")
    if java is None:
        raise MetricUnavailable("METEOR 1.5 needs a Java runtime; `java` is not on PATH")
    hyp_t, ref_t = _coco_inputs(hyps, refs)
    with _METEOR_LOCK:
        proc, err = _meteor_process(java, jar)
        try:
            return _meteor_talk(proc, hyp_t, ref_t)
        except (OSError, ValueError) as e:
            _close_meteor()
            err.seek(0)
            tail = err.read()[-500:].decode("utf-8", "replace")
            raise MetricUnavailable(f"METEOR jar failed: {e}; stderr: {tail}") from e


# One METEOR JVM per process, started on first use and asked again by every later call (as pycocoevalcap's
# Meteor object does): starting Java and loading the paraphrase table costs ~5 s, which every evaluation of a
# run (and every job of a sweep in one process) would pay again. Each call's SCORE/EVAL exchange stands alone.
# A forked child starts its own (the pipes belong to the parent's), a failed exchange closes it, exit ends it.
_METEOR: dict = {}
_METEOR_LOCK = threading.Lock()


def _meteor_process(java: str, jar: str):
    m = _METEOR
    cmd = [java, "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
    if m.get("pid") == os.getpid() and m["cmd"] == cmd and m["proc"].poll() is None:
        return m["proc"], m["err"]
    _close_meteor()  # a dead JVM, another jar or java, or the parent's (after a fork: left to the parent)
    err = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(cmd, cwd=os.path.dirname(jar), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    except OSError as e:
        err.close()
        raise MetricUnavailable(f"cannot start Java for METEOR: {e}") from e
    m.update(pid=os.getpid(), cmd=cmd, proc=proc, err=err)
    return proc, err


@atexit.register
def _close_meteor() -> None:
    m = _METEOR
    if m and m["pid"] == os.getpid():
        m["proc"].kill()
        m["proc"].wait()
        m["err"].close()
    m.clear()


def _meteor_talk(proc, hyp_t, ref_t) -> float:
    # The jar answers line by line, so one SCORE line per item gives its statistics, then
    # one EVAL line with all of them gives the item scores and, last, the corpus score.
    def ask(line: str) -> str:
        proc.stdin.write((line + "\n").encode("utf-8"))
        proc.stdin.flush()
        return read()

    def read() -> str:
        out = proc.stdout.readline()
        if not out:
            raise ValueError("the METEOR process ended early")
        return out.decode("utf-8").strip()

    stats = []
    for h, rs in zip(hyp_t, ref_t):
        h = h.replace("|||", "").replace("  ", " ")  # as pycocoevalcap's _stat
        stats.append(ask(" ||| ".join(("SCORE", " ||| ".join(rs), h))))
    ask("EVAL ||| " + " ||| ".join(stats))  # first item's score
    for _ in range(len(stats) - 1):
        read()
    return float(read())


METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def e2e_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]],
               names: Sequence[str] = METRICS) -> dict[str, float | dict]:
    """The official scores named (all five by default); an unavailable one is ``{"unavailable": reason}``."""
    _check(hyps, refs)
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown E2E metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    fns = {"bleu": bleu, "nist": nist, "meteor": meteor, "rouge_l": rouge_l, "cider": cider}
    out: dict[str, float | dict] = {}
    for name in names:
        fn = fns[name]
        try:
            out[name] = fn(hyps, refs)
        except MetricUnavailable as e:
            out[name] = {"unavailable": e.reason}
    return out
