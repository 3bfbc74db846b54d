# tunnelhub — the README's two commands are `make synth` and `make test`.
# Both work on a fresh Debian 12 machine as root with only PyPI, npm and Debian's archive
# reachable: they create the virtualenv from pyproject.toml and install what they need.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
SPEC        ?= examples/hubs.yaml
OUT         ?= cdktf.out
DIST        ?= dist
PYTEST_ARGS ?=

# Debian packages the tests drive for real (sshd, autossh, HAProxy, socat, MariaDB in network
# namespaces; PostgreSQL for the health checks; cloud-init's schema check; lintian, shellcheck,
# strace and debootstrap for the on-prem package; systemd-nspawn to boot the proxies and the tunnel
# host from a debootstrapped image, tests/boot).
TEST_DEBS := openssh-server openssh-client autossh haproxy socat mariadb-server mariadb-client postgresql openssl \
             cloud-init lintian debootstrap dpkg-dev iproute2 nftables iptables systemd shellcheck strace \
             systemd-container

# The example on-prem packages: `make synth` builds them the way a user would after deploy, from
# the example stack outputs, one per tunnel host of each hub (weu has two). With another SPEC, name
# its hubs and outputs file (or leave empty).
ifeq ($(SPEC),examples/hubs.yaml)
ONPREM_HUBS ?= weu use
endif
ONPREM_OUTPUTS ?= examples/outputs.json

.PHONY: synth test bench lab boot venv venv-test debs clean help

help:
	@echo "make synth   synthesize every example stack into $(OUT)/ (and build the example .debs, one per tunnel host)"
	@echo "make test    install test dependencies (venv + Debian packages) and run the test suite"
	@echo "make bench   run the benchmarks under bench/ and print their numbers"
	@echo "make lab     run the end-to-end network-namespace lab alone and print its report"
	@echo "make boot    boot the generated proxies and tunnel host under real systemd/cloud-init, print the report"

$(VENV)/.base-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.base-installed
	$(PIP) install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# checkov pins older libraries than the test extras, so it gets a virtualenv of its own.
$(VENV)-checkov/.installed: requirements-checkov.txt
	test -x $(VENV)-checkov/bin/python || $(PYTHON) -m venv $(VENV)-checkov
	$(VENV)-checkov/bin/pip install --quiet --disable-pip-version-check -r requirements-checkov.txt
	touch $@

venv: $(VENV)/.base-installed
venv-test: $(VENV)/.test-installed

# Install the Debian packages the tests need, only those missing. A temporary policy-rc.d keeps
# their maintainer scripts from starting services (sshd, MariaDB) on the host: the tests start
# their own daemons inside network namespaces.
debs:
	@missing=""; for p in $(TEST_DEBS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test needs root to install:$$missing" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  made_policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1; fi; \
	  ( apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing ); rc=$$?; \
	  [ -n "$$made_policy" ] && rm -f /usr/sbin/policy-rc.d; \
	  exit $$rc; \
	fi

synth: $(VENV)/.base-installed
	$(VENV)/bin/tunnelhub synth $(SPEC) --out $(OUT)
	@set -e; for hub in $(ONPREM_HUBS); do \
	  $(VENV)/bin/tunnelhub onprem build-deb $(SPEC) --hub $$hub --all-tunnel-hosts --outputs $(ONPREM_OUTPUTS) --out $(DIST); \
	done

test: $(VENV)/.test-installed $(VENV)-checkov/.installed debs
	$(PY) -m pytest $(PYTEST_ARGS)

lab: $(VENV)/.test-installed debs
	$(PY) -m pytest tests/e2e -m e2e -s -q $(PYTEST_ARGS)

# The boot scenarios (docs/boot.md): the first run on a machine builds the bootable Debian 12 image
# (~1.5 minutes, cached in .cache/boot/), later runs take ~3 minutes.
boot: $(VENV)/.test-installed debs
	$(PY) -m pytest tests/boot -m boot -s -q $(PYTEST_ARGS)

# The benchmarks that print the project's figures (bench/jsii_probe.py is the ~35-minute research
# probe behind docs/synth-speed.md: run it by hand).
BENCHES := bench/synth.py bench/health_bench.py bench/datapath.py bench/live_config.py

bench: $(VENV)/.test-installed debs
	@set -e; for b in $(BENCHES); do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(OUT) $(DIST) .pytest_cache
