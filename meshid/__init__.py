"""meshid: shared SPIFFE primitives used by both the issuer (server) and the agent."""

__version__ = "0.1.0"
