"""Quality evaluations of the eviction policies: `python -m engine.eval {ppl,retrieval,longbench,analysis,data}`."""
