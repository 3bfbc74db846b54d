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
- ``generated``  run a proxy from its extracted cloud-init (sshd, HAProxy, health daemon, sysctl)
- ``hub``        the lab as a tunnelhub hub: spec, rendered cloud-init, built .deb, running units
- ``cdc``        the streaming reader and the on-prem writer of the long-lived-connection scenario
- ``fixtures``   skip when the lab cannot run; one lab shared by a module's tests
- ``report``     the scenarios' measured figures, printed as one table at the end of the run
- ``machine``    a booted machine: ``systemd-nspawn --boot`` of the test image in a lab namespace
- ``stack``      a synthesized stack "applied": references and computed attributes, as the providers
- ``fakecloud``  the cloud at the network edge: IMDS (Azure, AWS), Key Vault, moto's SSM and S3
- ``tls``        the lab CA for the fake cloud's HTTPS endpoints
- ``boothub``    the lab's hubs deployed and booted for real (tests/boot, docs/boot.md)
"""
