"""tunnelhub's network-namespace lab: real daemons in namespaces, stopped by PID.

Modules:
- ``netns``      namespaces, veth links, silent link cuts, running code inside a namespace
- ``proc``       daemons started by path, logs per daemon, bounded waits
- ``cloudinit``  extract a rendered cloud-init's ``write_files`` into a per-proxy root
- ``unit``       parse a systemd unit + env file, expand ``ExecStart``, run it under ``Restart=``
- ``mariadb``    a real MariaDB server in the ``db`` namespace
- ``sshd``       an sshd per proxy namespace with a given drop-in and authorized_keys
- ``haproxy``    HAProxy as the load balancer (HTTP or plain-TCP checks) and as a proxy data plane
- ``reference``  the reference design (socat, TCP-connect health check, autossh unit)
- ``client``     the query driver (PyMySQL) recording every query
- ``health``     ask a proxy's health endpoint as the LB would
- ``lab``        one object wiring the pieces for a scenario
- ``generated``  run tunnelhub's generated artifacts (extracted cloud-init, on-prem unit)
- ``samples``    the SAMPLE stand-ins for those artifacts (``tests/e2e/samples/``)
"""
