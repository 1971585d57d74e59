"""TF-IDF + logistic regression (scikit-learn) on exactly the train/validation split that a bigjax
classification config uses: the reference point for the seed workflow's accuracies.

    .venv/bin/python scripts/tfidf_baseline.py configs/minilm_sentiment.yaml [key=value ...]

Prints one line: `tfidf_logreg eval_accuracy=... eval_macro_f1=... params=P weights_bytes=B (N train,
M validation rows)`: P counts the classifier's weights, B their bytes plus the idf table's and the
vocabulary's (as UTF-8 text), what a saved model needs.
scikit-learn is a test/bench dependency of bigjax, not a runtime one.
"""

from __future__ import annotations

import argparse
import sys

from bigjax.config import load_config
from bigjax.data.classification import label_names, split_rows
from bigjax.errors import BigjaxError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    try:
        cfg = load_config(args.config, args.overrides)
        train, val = split_rows(cfg)[:2]
    except BigjaxError as e:
        print(f"tfidf_baseline: error: {e}", file=sys.stderr)
        return 2
    names = label_names([r.label for r in train])
    index = {n: i for i, n in enumerate(names)}
    y_train = [index[str(r.label)] for r in train]
    y_val = [index.get(str(r.label), -1) for r in val]
    # word 1-2 grams and sublinear tf: the usual strong linear baseline for short texts
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform([r.text for r in train])
    clf = LogisticRegression(max_iter=2000, C=2.0).fit(x_train, y_train)
    pred = clf.predict(vec.transform([r.text for r in val]))
    params = clf.coef_.size + clf.intercept_.size
    size = (clf.coef_.nbytes + clf.intercept_.nbytes + vec.idf_.nbytes
            + sum(len(t.encode()) + 1 for t in vec.vocabulary_))
    print(f"tfidf_logreg eval_accuracy={accuracy_score(y_val, pred):.4f} "
          f"eval_macro_f1={f1_score(y_val, pred, average='macro'):.4f} "
          f"params={params} weights_bytes={size} "
          f"({len(train)} train, {len(val)} validation rows)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
