"""``python -m sg2img``: the same as the ``sg2img`` command."""

from .cli import main

raise SystemExit(main())
