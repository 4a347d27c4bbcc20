"""Reject prompts that crash upstream SGLang 0.5.23's scheduler, at the tokenizer-manager boundary (patches/
input-validation.md). A bug fix: registered whatever tiers are on.

Two inputs pass upstream's request validation and then kill the scheduler, which takes the whole server down:
  * an empty prompt (`"text": ""`, or `"input_ids": []`): the first forward has no tokens to reshape
    (RuntimeError in the MoE layer on CPU); every other request is lost with it;
  * a token id outside [0, vocabulary size) in `input_ids`: IndexError in the embedding lookup.
`TokenizerManager._validate_one_request(obj, input_ids)` is where upstream checks a tokenized request (length
against the context, `token_ids_logprob` against the vocabulary) and every ValueError it raises is answered as
HTTP 400 (`http_server.serve_generate_request`, and an error event for a streamed request); we raise ours there,
before upstream's checks run.
"""
from __future__ import annotations

HOOKS = (
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", "AROUND", "validate_prompt"),
)


def prompt_error(input_ids, vocab_size: int | None) -> str | None:
    """Why `input_ids` cannot be served, or None. input_ids: the tokenized prompt (a list of int); vocab_size:
    the model's vocabulary (None: ids are not checked)."""
    if len(input_ids) == 0:
        return "The prompt is empty: send at least one token (non-empty text or input_ids)."
    if vocab_size is None or 0 <= min(input_ids) and max(input_ids) < vocab_size:
        return None
    position, token_id = next((i, t) for i, t in enumerate(input_ids) if not 0 <= t < vocab_size)
    return (f"input_ids[{position}] = {token_id} is not a token id of this model: the vocabulary has {vocab_size} "
            f"tokens, so ids must be in [0, {vocab_size}).")


def validate_prompt(original_fn, self, obj, input_ids, *args, **kwargs):
    """AROUND TokenizerManager._validate_one_request: a ValueError here is upstream's HTTP 400. Requests that bring
    embeddings (no ids are looked up) are not checked, and multimodal ones are checked only for emptiness (their
    ids carry placeholder values beyond the vocabulary that the processor replaces)."""
    if input_ids is not None and obj.input_embeds is None:
        vocab_size = None if obj.contains_mm_input() else self.model_config.vocab_size
        error = prompt_error(input_ids, vocab_size)
        if error is not None:
            raise ValueError(error)
    return original_fn(self, obj, input_ids, *args, **kwargs)
