"""The runtime: the only place that wires configuration, store, CA, audit and listeners together.

What it is for: the daemon's lifecycle (start, serve, stop), the access workflow service that the
protocol layers call, and the expiry sweep that ends grants and their sessions on time.
What it must not do: parse protocols (that is ``proxy.ssh``), or decide policy (``proxy.access``).
"""
