"""The access domain: requests, approvals, grants and policy decisions.

What it is for: every rule about who may ask for what, who may approve, and how requests and grants
change state, as pure functions of their inputs and an explicit ``now``.

What it must not do: any I/O (no store, no sockets, no files, no logging) or read the clock itself.
"""
