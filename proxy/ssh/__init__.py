"""The SSH side: the proxy's own SSH server (authentication, the command shell, direct-tcpip) and the
bridge that terminates a jump connection and relays its sessions to the target.

What it must not do: touch the store directly (it calls the runtime's ``AccessService``), or relay a
connection to anything but a configured target under a live grant.
"""
