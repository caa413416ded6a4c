"""Until every test imports peer_support itself."""
from peer_support import agreement, context, need, ours, run  # noqa: F401
