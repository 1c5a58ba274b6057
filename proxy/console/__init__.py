"""The web console at ``/ui/``: server-rendered pages over the store, signed-in by cookie.

Pages are Jinja2 templates with autoescape on, styled by one stylesheet and helped by one
small script, all served from this package (``templates/``, ``static/``), so ``pip install``
gives a working console with no build step and nothing fetched from elsewhere. ``setup``
registers the routes and the cleanup context that loads the session key; ``console.enabled:
false`` leaves them out.
"""

from __future__ import annotations

from proxy.console.routes import setup

__all__ = ["setup"]
