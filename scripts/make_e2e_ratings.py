"""Build a small "restaurant reviews" set for domain transfer from E2E's dev split.

    python scripts/make_e2e_ratings.py ../shared/data/e2e/dev.csv docs/transfer/e2e-ratings-dev.csv

E2E (Novikova et al. 2017, CC BY-SA 4.0) pairs a meaning representation (MR) of a restaurant with
crowd-written descriptions. Where the MR's `customer rating` is high (`high`, `5 out of 5`) or low
(`low`, `1 out of 5`) and the description mentions it (rated / rating / star), the description is
a short text about a restaurant whose label is that rating: `high` or `low`. Average and 3-of-5
ratings are left out. `--per-class` descriptions of each label are drawn with a fixed seed, so the
file is the same every time. Columns: `review,rating,mr`.

A prompt trained on SST-2 movie sentences can then be scored on it (positive -> high,
negative -> low): `ptune eval run=<sst2 run> task=custom task.train_file=... task.eval_file=...
task.text_column=review task.label_column=rating label_map=positive:high,negative:low`.
"""

from __future__ import annotations

import argparse
import csv
import random
import re

LABEL = {"high": "high", "5 out of 5": "high", "low": "low", "1 out of 5": "low"}
MENTIONS = re.compile(r"rat(ed|ing)|star", re.IGNORECASE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="E2E CSV (mr,ref), e.g. ../shared/data/e2e/dev.csv")
    ap.add_argument("out", help="the CSV to write")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    by_label: dict[str, list[dict]] = {"high": [], "low": []}
    with open(args.source, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            m = re.search(r"customer rating\[([^\]]*)\]", row["mr"])
            label = LABEL.get(m.group(1)) if m else None
            if label and MENTIONS.search(row["ref"]):
                by_label[label].append({"review": row["ref"].strip(), "rating": label, "mr": row["mr"]})
    rng = random.Random(args.seed)
    rows = [r for label in ("high", "low") for r in rng.sample(by_label[label], args.per_class)]
    rng.shuffle(rows)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["review", "rating", "mr"])
        w.writeheader()
        w.writerows(rows)
    print(f"{args.out}: {len(rows)} rows ({args.per_class} high, {args.per_class} low) from "
          f"{sum(map(len, by_label.values()))} candidates")


if __name__ == "__main__":
    main()
