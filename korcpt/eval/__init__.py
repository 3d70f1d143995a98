"""Evaluation: validation perplexity and KorMedMCQA accuracy, during training and standalone.

    perplexity.py   evaluate_perplexity(model, batches, reduce=...)   token-weighted loss/ppl over all
                    ranks (sum NLL / target tokens), per source when batches carry token_source
    mcq.py          load_mcq(path) -> (items, skipped);  score_mcq(model, tokenizer, items, mode=...)
                    accuracy by likelihood: "letter" (next-token " A".." E" after 정답:) or "choice"
                    (log-likelihood of each option's text), few-shot, batched, split across ranks
    loading.py      load_for_eval(model, adapter=..., tokenizer=...) for tools/eval_mcq.py, eval_ppl.py
"""
