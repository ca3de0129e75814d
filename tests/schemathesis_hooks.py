"""A check for schemathesis (tests/test_schemathesis.py loads this file through SCHEMATHESIS_HOOKS): the built-in
positive_data_acceptance, less the one rule of nanotune.serve that JSON Schema cannot state."""

import schemathesis


@schemathesis.check
def positive_data_accepted_within_the_context(ctx, response, case):
    """A request the schema allows is answered (or, under load, 429), unless its prompt's tokens plus max_tokens
    exceed the model's context: a sum over the tokenizer's output, which no schema keyword can express, answered
    400 with OpenAI's code context_length_exceeded."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code < 300:
        return None
    if response.status_code in (401, 405, 429):  # (credentials and methods: other checks' business; load)
        return None
    error = response.json().get("error", {}) if response.headers.get("content-type") == ["application/json"] else {}
    if response.status_code == 400 and error.get("code") == "context_length_exceeded":
        return None
    raise AssertionError(f"a schema-valid request was refused with {response.status_code}: {error or response.text}")
