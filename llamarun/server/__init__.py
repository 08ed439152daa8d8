"""`llamarun serve`: an OpenAI-compatible HTTP server with continuous batching.

scheduler.py decodes every active request together (one forward per step, a KV cache slot each);
app.py puts OpenAI's routes and shapes over it (starlette, run by uvicorn); chat.html is the page at /.
"""
from .app import create_app, serve
from .scheduler import Scheduler

__all__ = ["create_app", "serve", "Scheduler"]
