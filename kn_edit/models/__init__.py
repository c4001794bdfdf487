"""The model wrapper: architecture adapters (where each family keeps its layers, value projections and
embeddings), owned hooks, prompt encoding, :class:`KnModel`, loading from a name, folder, GGUF file or the hub, the
offline models shipped in PyPI packages, and saving. Depends on ``storage`` and ``errors`` only."""
