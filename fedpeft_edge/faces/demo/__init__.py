"""``fedpeft-edge demo``: a whole federation on this machine, with real processes, a real model, real data.

What happens, in order (:func:`run_demo` in :mod:`.run`):

1. *Central preparation* (cached): export the pretrained backbone to ONNX, build the ORT training
   artifacts for the PEFT spec, load a subset of the data set, split it non-IID over the sites, and write
   each site's shard (its local training part and a held-out local test part) into the run folder
   (:mod:`.site` holds the shard format and the agents' trainer factory).
   Raw data is then only ever read by the site that owns the shard.
2. Start a local MQTT broker (embedded amqtt by default, or Mosquitto), the aggregator and N agents, each
   a separate OS process running the real services (``AggregatorService``, ``EdgeAgent``): :mod:`.fleet`.
3. Follow the federation live from the aggregator's round metrics (participants, client loss, accuracy
   of the global on each site's own test data, bytes up); collect every published global adapter
   (:mod:`.progress`).
4. Evaluate the global adapter of every round on the global test set and each site's accuracy before and
   after, then write a report folder: ``report.json``, ``report.md``, ``accuracy.png``, ``bytes.png``
   (:mod:`.summary`).

``FEDPEFT_EDGE_DEMO_QUICK=1`` (or ``--quick``) shrinks everything for CI: 2 agents, 2 rounds, a small subset
(:mod:`.options`).
"""

from __future__ import annotations

from fedpeft_edge.faces.demo.fleet import FLEET
from fedpeft_edge.faces.demo.options import QUICK_ENV, DemoOptions, load_demo_config, quick_requested
from fedpeft_edge.faces.demo.run import run_demo
from fedpeft_edge.faces.demo.site import FACTORY, load_shard, save_shard, site_trainer_setup
from fedpeft_edge.faces.demo.summary import write_demo_report

__all__ = [
    "FACTORY",
    "FLEET",
    "QUICK_ENV",
    "DemoOptions",
    "load_demo_config",
    "load_shard",
    "quick_requested",
    "run_demo",
    "save_shard",
    "site_trainer_setup",
    "write_demo_report",
]
