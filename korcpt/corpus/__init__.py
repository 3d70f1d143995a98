"""Raw sources -> clean, mixed training documents (``raw_text_mixed.jsonl`` + ``report.json``), and
explicit validation files -> clean validation documents (``val_documents.jsonl``).

    readers.py    file -> Record | Rejected       (JSON array, JSONL, .txt, save_to_disk Arrow; streamed)
    textformat.py which cleaner a Korean record gets: namu, wiki or plain (PATH:FORMAT, else detected)
    wiki.py       Namu/MediaWiki markup -> text   (Namu and wiki records; plain and .txt only normalised)
    medical.py    MCQ / dictionary / symbol -> sentence, with particles.py choosing 은/는, 이/가, 을/를
    text.py       normalisation and filters       (min chars, Hangul ratio; the drop reasons)
    validation.py validation files -> val_documents.jsonl (cleaned as Korean records, no filters)
    build.py      all of it -> dedup, exclude held-out questions, x medical, seeded shuffle, report

Entry point: :func:`korcpt.corpus.build.build_corpus` with a :class:`~korcpt.corpus.build.CorpusOptions`.
"""
