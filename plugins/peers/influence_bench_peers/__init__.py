"""Peer influence libraries as influence-bench plug-ins (see ``common``)."""
