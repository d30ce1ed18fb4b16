"""``python -m sg2img``: the same as the ``sg2img`` command."""

from sg2img.cli import main

raise SystemExit(main())
