"""Serve a registered student over HTTP with Ray Serve (``mint-ray serve``).

One application serves one model (so one task). One concern per module:

- ``config``: what an application (``ServeConfig``) and ``mint-ray serve`` are configured with;
- ``schemas``: the request and response bodies, and the one error shape;
- ``inputs``: a request's fields checked against the limits and the served task
  (numbers, nesting, text that encodes, control tokens, prompt tokens), its image
  decoded, its prompt built (pure: no Ray, no I/O);
- ``labels``: label names -> ids, and the ranked labels of an answer;
- ``loading``: which model a URI names; loading it with its task and label ids;
- ``guard``: the ASGI middleware in front of every route (API key, body size, and a
  deadline for the body: 408 instead of a request slot held by a trickling client);
- ``proxy``: what runs in Serve's HTTP proxy, in front of every application (a 400 for
  header values the proxy itself would fail on);
- ``deployment``: the Serve replica (the model, the alias watcher, the batcher; a
  request that fails inside a batch fails alone);
- ``routes``: a replica's HTTP routes;
- ``app``: ``build_app``, what ``serve run``/``serve deploy`` and the RayService import
  (``mint_ray.serving.app:build_app``; their configs are in the repository's ``serving/``);
- ``run``: the ``mint-ray serve`` stage (preflight, deploy, serve until Ctrl-C or
  SIGTERM, then delete only its own application, draining it, and exit 0);
- ``client``: ``ask`` (one request, stdlib only) and ``serve_and_ask`` (the local demo).

Nothing is imported here: a client or a config reader does not pull in Ray Serve.
"""
