"""nanotune.serve: a model behind an OpenAI-compatible API and a web chat page (python -m nanotune.serve).

server.py      the FastAPI app and `main`: routes, the chat page (chat.html), the engine's thread
engine.py      continuous batching: requests join and leave one batch of decoding rows
openai_api.py  the OpenAI API's JSON: requests checked, answers, log-probabilities, streamed chunks, errors
api_schema.py  the request bodies as JSON Schema: what the server checks and /openapi.json publishes
openapi.py     the OpenAPI document served at /openapi.json
documents.py   --docs: each chat's question answered from the top BM25 passages of a folder of documents
"""
