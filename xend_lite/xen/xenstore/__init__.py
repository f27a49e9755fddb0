"""A xenstore server for one guest: the store (a tree of nodes with permissions,
transactions, watches and per-domain quotas), the wire protocol, the ring page, and a server
that glues them and answers the operator. Nothing here knows of KVM or event channels: the
page is reached through a :class:`~xend_lite.xen.page.Page` and events go out through a
``notify`` callable."""
