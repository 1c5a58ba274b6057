"""``python -m proxy`` is the ``completions-proxy`` command."""

from proxy.cli import main

if __name__ == "__main__":  # not when a worker process (import's parser) loads this module
    raise SystemExit(main())
