"""The composition root: builds one VM (machine, Xen platform, guest image) from a spec and
offers the daemon the typed interface it drives (``api.VmApi``)."""
