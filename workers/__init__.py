"""What runs inside a worker: the Ollama client, stream publishing, the embedded Redis, processes.

Nothing here knows corral's queue or key names; the tasks hand in what is needed. Import the
modules themselves (``workers.ollama_client``...): this package imports nothing eagerly, so
that a producer which needs one helper does not pay for the HTTP stack.
"""
