"""``p4q serve``: zero-shot classification and embeddings of a ``.p4q`` artifact over HTTP, with dynamic batching.

Modules, one concept each: :mod:`~p4q_engine.serve.config` (limits), :mod:`~p4q_engine.serve.errors` (the JSON
error shape), :mod:`~p4q_engine.serve.inputs` (request bodies -> validated pixels), :mod:`~p4q_engine.serve.batcher`
(the dynamic batcher), :mod:`~p4q_engine.serve.metrics` (Prometheus), :mod:`~p4q_engine.serve.app` (routes) and
:mod:`~p4q_engine.serve.server` (uvicorn, graceful stop). Importing this package imports none of the web stack.
"""
