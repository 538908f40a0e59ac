"""The pure core: saga definitions, the saga state machine and events. No I/O here."""
