"""korcpt: continued pretraining of Korean medical language models.

The data path, one module per stage::

    raw sources ──> corpus/ ──> raw_text_mixed.jsonl ──> shards/ ──> DIR/{train,val}/*.bin + manifest.json
    (namu json,     clean text,  (x5 medical,             tokenize,     reader: shuffled, rank-sharded,
     mcq jsonl,     one doc per   seeded shuffle)          pack, EOS     resumable fixed-length sequences
     dicts)         record)                                                        │
                                                                                   v
    vocab/ (extended tokenizer, new-row init) ──> model/ (load, LoRA, embeddings) ──> train/ (Accelerate +
    DeepSpeed loop, checkpoints, TensorBoard) ──> OUTPUT_DIR (adapter, tokenizer/, training_info.json)
                                                        └──> eval/ (validation perplexity, KorMedMCQA)

Library code never parses ``sys.argv`` or prints; ``tools/`` and ``launch/`` do.
"""

__version__ = "0.1.0"
