"""The label convention between the data stages, which write ``labels``, and the loss, which reads them.

:data:`IGNORE_INDEX` marks a position without a target. The shard reader writes it where a document
starts (a document is not predicted from the one before it, :func:`korcpt.shards.reader.make_sample`);
the loss (:mod:`korcpt.model.loss`, which re-exports it) and every token count skip it. It is the loss's
constant, but the reader that produces labels sits in an earlier stage than the model and may not
import it from there, so it lives here, below every stage. The value is the default ``ignore_index``
of ``torch.nn.functional.cross_entropy`` (and of HuggingFace models' own loss), so the same labels
also work with a model's built-in loss.
"""

IGNORE_INDEX = -100
