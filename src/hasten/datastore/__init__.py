"""REST's retrieval datastore: a tokenized corpus and its suffix array in one memory-mapped file.

`store`: the file format, opening and checking it, and the lookups the REST drafter uses.
`build`: tokenizing sources, the suffix array, writing (`hasten datastore` is in `commands`).
"""

from .build import (build_datastore, build_from_token_lists,
                    build_from_tokens, collect_documents, open_source,
                    suffix_array)
from .store import (Datastore, DatastoreError, token_dtype, tokenizer_fingerprint,
                    tokenizer_vocab_size, write_datastore)

__all__ = ["Datastore", "DatastoreError", "build_datastore",
           "build_from_token_lists", "build_from_tokens", "collect_documents",
           "open_source", "suffix_array", "token_dtype", "tokenizer_fingerprint",
           "tokenizer_vocab_size", "write_datastore"]
