"""Embeddings into a vector store and search over them.

* :mod:`tnlbt.index.store` -- the small ``VectorStore`` interface, its qdrant-client and qdrant-edge
  implementations, versioned collections with an alias switch and keep-N pruning;
* :mod:`tnlbt.index.embed` -- ``tnlbt index``: Ray Data batch inference over the processed Parquet, the
  ``Encoder`` used by every query path;
* :mod:`tnlbt.index.search` -- ``IndexReader`` / ``Searcher`` (used by the API, the UI and ``tnlbt search``).

Nothing is imported here: torch, Ray and the Qdrant clients load only when a submodule needs them.
"""
