"""The shared process layer of the lab's servers and their clients.

What every room (pool, backup, cms, admin, dns) needs the same way, once:

- :mod:`.files`: writing a file so a crash leaves the old one or the new one;
- :mod:`.auth`: the control APIs' bearer-token check (a FastAPI dependency);
- :mod:`.app`: the one construction of every control API (errors, docs, unknown fields);
- :mod:`.limits`: the request body limit;
- :mod:`.server`: serving a FastAPI app with uvicorn inside the owner's loop;
- :mod:`.http`: the client side of the control APIs (auth, errors, timeouts);
- :mod:`.settings`: the environment variables every lab process reads.

This package imports none of the rooms, and this module imports nothing:
importing :mod:`.files` stays cheap (the SIP stack writes its certificates
with it).
"""
