"""Faces of the system: the demo, the experiment grid, the on-device bench and their reports.

This is the top layer: it composes models/data, PEFT artifacts, trainers, the codec, aggregation
strategies and the MQTT services. Nothing below imports from here.
"""
