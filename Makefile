# The two commands a newcomer needs: `make demo` and `make test`. Both set up what is missing.
VENV := .venv
PY   := $(VENV)/bin/python
PYTEST_VM_FLAGS := -q -p no:cacheprovider

.PHONY: setup demo test lint test-host test-vm test-vm-systemd clean

setup:
	@tools/setup

# What this kernel gives XX; the paper's web server (§3.1: home high, profile medium, images
# low) as functions behind HTTP triggers under `xxctl up`, open-loop load, XX vs classes
# ignored (docs/demo.md); then a local cluster (2 shards, a real xxnode) under mixed load.
# Under a minute on our 2-core host.
demo: setup
	@$(VENV)/bin/xxctl doctor
	@echo
	@$(PY) tools/demo_web
	@echo
	@$(PY) tools/demo_cluster

test: setup lint test-host test-vm test-vm-systemd

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Unit (pure) and host (real processes on this kernel) lanes.
test-host: setup
	$(PY) -m pytest tests/unit tests/host

# The real-kernel lane: one VM boot runs the whole of tests/vm.
test-vm: setup
	vm/run --memory 2G --cpus 2 --swap 1G -- python -m pytest $(PYTEST_VM_FLAGS) tests/vm

# The same kernel with systemd as PID 1: XX installed by `xxctl install`, its units started,
# killed, stopped and hung under a real systemd (docs/vm.md).
test-vm-systemd: setup
	vm/run --systemd --memory 2G --cpus 2 --swap 1G -- python -m pytest $(PYTEST_VM_FLAGS) tests/vm_systemd

clean:
	rm -rf vm/.cache build *.egg-info
	-$(MAKE) -s -C ebpf clean 2>/dev/null
