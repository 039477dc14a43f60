"""`motif-video serve`: an OpenAI-style video API and a web UI on one persistent job queue (see docs/serve.md)."""
