"""NetKernel control plane: daemon, CLI, tenant sandboxes.

The data plane (GuestLib and the CoreEngine) is C; this package sets up the namespaces and
links it runs on, starts the engine, and launches programs into tenants.
"""

from __future__ import annotations

__version__ = "0.1.0"
