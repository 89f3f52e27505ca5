"""Who the user is: authentication methods (publickey, keyboard-interactive and password through
Linux-PAM, and chains of them) and identities (users and groups from the config or from NSS).

What it must not do: decide access (that is proxy.access), keep or log secrets, or block the event
loop (PAM and NSS lookups run in threads).
"""


def address_of(peer: str) -> str:
    """The address of a peer written ``HOST:PORT`` (an IPv6 host keeps its colons), as lockouts,
    throttling and PAM's PAM_RHOST use it."""
    return peer.rsplit(":", 1)[0]
