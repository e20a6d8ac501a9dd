"""The NATS JetStream side: connection and auth, fast pulls, acks by reply subject, dead letters, stream stats."""
