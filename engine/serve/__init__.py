"""`python -m engine.serve`: an OpenAI-compatible HTTP server over the engine, with the eviction policy and
budget chosen per request and concurrent requests decoded together (continuous batching).

scheduler.py owns the model (one thread, batched decode steps); app.py is the HTTP side (FastAPI, the
optional extra `serve`); __main__.py the command line.
"""
