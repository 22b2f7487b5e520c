# The sasrec-d03-h2 recipe as `[retriever.train]` overrides, sourced by run.sh and ensemble.sh (retriever-service/recipes/sasrec-d03-h2.toml holds the same keys for `--recipe-seeds`):
# SASRec, max_len 50, 2 heads, dropout .3, no first-item target, length-grouped batches.
export LLAMAREC_RETRIEVER__TRAIN__MODEL__KIND=sasrec \
  LLAMAREC_RETRIEVER__TRAIN__MODEL__MAX_LEN=50 \
  LLAMAREC_RETRIEVER__TRAIN__MODEL__NUM_HEADS=2 \
  LLAMAREC_RETRIEVER__TRAIN__MODEL__DROPOUT=0.3 \
  LLAMAREC_RETRIEVER__TRAIN__FIRST_ITEM_TARGET=false \
  LLAMAREC_RETRIEVER__TRAIN__GROUP_BY_LENGTH=true
