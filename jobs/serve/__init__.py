"""The on-demand endpoint: a Ray Serve application speaking the OpenAI Images API.

``config`` holds the typed application config, ``openai_schema`` the HTTP bodies, ``errors`` the error bodies,
``budget`` a request's cost in model calls, ``deployments`` the generator and scorer deployments
(``@serve.batch``), ``ingress`` the FastAPI front door, and ``app`` the builder that
``serve run jobs.serve.app:build_app`` and ``maskray serve`` call. This package imports nothing itself, so
``import jobs.serve`` loads neither Ray nor torch.
"""
