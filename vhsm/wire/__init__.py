"""vhsm.wire: the sans-IO codec of vhost-user messages (header, payloads, framing, JSON)."""
