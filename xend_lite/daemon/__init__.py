"""The daemon layer: config, the VM-owner controller and its run-state machine, the event
stream, the JSON-RPC control plane over aiohttp, systemd integration and the process's
life cycle. The event loop never runs guest code and never blocks: it sends commands to the
VM owner thread and awaits one reply each."""
