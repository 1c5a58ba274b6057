"""The web console at ``/ui/``: server-rendered pages over the store, signed-in by cookie.

Pages are Jinja2 templates with autoescape on, styled by one stylesheet and helped by one
small script, all served from this package (``templates/``, ``static/``), so ``pip install``
gives a working console with no build step and nothing fetched from elsewhere. ``setup``
registers the routes and the cleanup context that loads the session key; ``console.enabled:
false`` leaves them out.

Modules: ``routes`` (the route table, ``setup``), ``auth`` (sign-in, sessions, CSRF),
``session`` (signing), ``log`` / ``usage`` / ``admin`` (the pages), ``entries`` and
``filters`` (the log's rows and its URL), ``conversation`` and ``charts`` (pure view models),
``render`` (Jinja2 and the security headers), ``state`` (the per-app state).
"""
