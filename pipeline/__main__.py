"""``python -m pipeline`` is the same as the ``qformer`` command."""

from pipeline.cli import main

raise SystemExit(main())
