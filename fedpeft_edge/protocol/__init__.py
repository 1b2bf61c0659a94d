"""What a site and the aggregator share: topics, wire envelope, reasons, codec, chunking, transport, config.

Key names: ``topics.Topics``; ``wire.UpdateMessage`` / ``GlobalMessage`` / ``StatusMessage`` and their
hostile-input decoders; ``reasons.WireFormatError``; ``codec.CodecConfig``, ``encode_vector``, ``parse``;
``indices`` (varint / bitmap index coding); ``chunking.Reassembler`` and ``chunk_spool.ChunkSpool``;
``transport.MqttTransport``; ``config`` (TOML). Submodules are not imported eagerly: import what you need.
"""

__all__ = ["chunk_spool", "chunking", "codec", "config", "fleet_report", "indices", "notices", "reasons",
           "topics", "transport", "wire"]
