"""``python -m fedpeft_edge`` is the same as the ``fedpeft-edge`` command."""

from fedpeft_edge.faces.cli import main

raise SystemExit(main())
