"""``python -m proxy`` is the ``completions-proxy`` command."""

from proxy.cli import main

raise SystemExit(main())
