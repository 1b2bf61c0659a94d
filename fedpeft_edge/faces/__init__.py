"""Faces of the system: the ``fedpeft-edge`` CLI, the demo, the experiment grid, the bench and reports.

The top room: it composes every room below (models, data, PEFT, training, protocol, site, central), and
nothing below imports from here. Submodules are not imported eagerly (``fedpeft-edge --help`` must not
import numpy): ``cli.main``, ``demo.run_demo``, ``experiment.run_experiment``, ``device_bench.run_bench``.
"""

__all__ = ["cli", "cli_commands", "demo", "device_bench", "experiment", "report", "tasks"]
