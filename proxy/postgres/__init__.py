"""The PostgreSQL side: the listener that drives ``proxy.pgwire`` and the provisioner of ephemeral
roles.

What it must not do: relay a client to anything but the configured target database, let a user see
the ephemeral role's password, or touch the store directly (the runtime passes what it needs).
"""
