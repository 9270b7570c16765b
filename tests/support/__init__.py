"""Stand-ins for what this toolkit needs but a test machine lacks: a tiny model, a Hub, hosts."""
