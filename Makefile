# MicroVM Sandbox: the two commands are `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MVM_STATE_DIR ?= $(HOME)/.microvm
export MVM_CACHE_DIR ?= $(HOME)/.cache/microvm
PROTO_FILES := $(shell find protos -name '*.proto')
# E2B's envd protos (Apache-2.0, third_party/e2b/README.md): the wire of the E2B SDKs, compiled beside ours.
E2B_PROTO_FILES := $(wildcard third_party/e2b/e2b_envd/*.proto)
GEN := gen/python

.PHONY: up down status test unit-test integration-test chaos soak deps apt venv protos lint images templates template-tests bench bench-code bench-desktop bench-density clean-state

up: deps protos images ## install, build, start etcd + all services, run a demo sandbox
	$(BIN)/mvm-supervisor start --state-dir $(MVM_STATE_DIR)
	$(BIN)/mvm-supervisor wait --state-dir $(MVM_STATE_DIR)
	@$(BIN)/mvm-supervisor banner --state-dir $(MVM_STATE_DIR)
	@if [ -x $(BIN)/mvm ] && [ -f $(MVM_CACHE_DIR)/images/default/current ]; then \
	  echo "--- demo: mvm run -- python3 -c 'print(6*7)'"; \
	  $(BIN)/mvm run -- python3 -c 'print(6*7)'; fi

down: ## stop everything started by `make up`
	@$(BIN)/mvm-supervisor stop --state-dir $(MVM_STATE_DIR)

status: ## health of every service
	@$(BIN)/mvm-supervisor status --state-dir $(MVM_STATE_DIR)

deps: apt venv

apt: ## Debian packages (skipped when already present)
	@need=""; for p in etcd-server etcd-client qemu-system-x86 qemu-utils busybox-static debootstrap e2fsprogs cpio iproute2 nftables kmod lz4 procps skopeo umoci musl xvfb openbox xdotool xterm x11-utils ffmpeg x11vnc novnc chromium prometheus nginx-light; do \
	  dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	if [ -n "$$need" ]; then echo "apt-get install$$need"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$need; \
	  if echo "$$need" | grep -qw prometheus && command -v systemctl >/dev/null; then \
	    echo "Debian's prometheus service is disabled: make up runs its own, fed from the registry"; \
	    $$SUDO systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true; fi; \
	  if echo "$$need" | grep -qw nginx-light && command -v systemctl >/dev/null; then \
	    echo "Debian's nginx service is disabled: nginx is only the E2B domain-form test's (deploy/e2b)"; \
	    $$SUDO systemctl disable --now nginx >/dev/null 2>&1 || true; fi; fi

venv: $(BIN)/.installed

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	@# The checkout itself is the code: put it on the venv's path instead of building a wheel.
	printf '%s\n' "$(CURDIR)" "$(CURDIR)/$(GEN)" "$(CURDIR)/clients/cli" "$(CURDIR)/clients/python/src" "$(CURDIR)/clients/mcp" "$(CURDIR)/clients/integrations" "$(CURDIR)/guest_agents/linux" > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/microvm-sandbox.pth
	printf '#!/bin/sh\nexec "$(CURDIR)/$(BIN)/python" -m mvm_cli.main "$$@"\n' > $(BIN)/mvm && chmod +x $(BIN)/mvm
	printf '#!/bin/sh\nexec "$(CURDIR)/$(BIN)/python" -m services.supervisor.main "$$@"\n' > $(BIN)/mvm-supervisor && chmod +x $(BIN)/mvm-supervisor
	printf '#!/bin/sh\nexec "$(CURDIR)/$(BIN)/python" -m microvm_mcp "$$@"\n' > $(BIN)/mvm-mcp && chmod +x $(BIN)/mvm-mcp
	touch $@

protos: venv $(GEN)/.stamp ## generate Python from protos/

$(GEN)/.stamp: $(PROTO_FILES) $(E2B_PROTO_FILES) Makefile
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -Iprotos -Ithird_party/googleapis \
	  --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTO_FILES)
	$(BIN)/python -m grpc_tools.protoc -Ithird_party/e2b --python_out=$(GEN) --pyi_out=$(GEN) $(E2B_PROTO_FILES)
	find $(GEN)/microvm $(GEN)/e2b_envd -type d -exec touch {}/__init__.py \;
	touch $@

lint: venv ## ruff (lint + format check), buf lint, and buf breaking against the previous commit
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	@if git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
	  $(BIN)/buf breaking --against '.git#ref=HEAD~1'; else echo "buf breaking: no previous commit with protos"; fi

images: venv ## build guest images (cached by recipe hash)
	@if [ -d images/templates ]; then $(BIN)/python -m images.builder build --all; fi

templates: ## build the heavy built-in templates (python, web, code-interpreter, desktop, e2b-desktop) on the running installation (`make up`), cached
	$(BIN)/python -m images.templates_build

template-tests: ## the built-in templates (python, web, code-interpreter, desktop, e2b-desktop) on the running installation, after `make templates`
	$(BIN)/python -m pytest -q -ra -s -m templates tests/standing

bench-density: deps protos images ## idle sandboxes this host holds: memory per sandbox, exec before/after, create rate (SANDBOXES=50, at most 200)
	$(BIN)/python -m bench.density --sandboxes $(or $(SANDBOXES),50)

bench-code: deps protos ## the code interpreter's figures on the running installation, after `make templates`
	$(BIN)/python -m bench.code

bench-desktop: deps protos ## the desktop's figures (screenshots, clicks, VNC frames) on the running installation, after `make templates`
	$(BIN)/python -m bench.desktop
	$(BIN)/python -m bench.e2b

test: deps protos lint images ## the whole suite: unit tests, then integration tests against real services
	$(BIN)/python -m pytest -q -ra tests

unit-test: deps protos ## fast tests: fakes at the edge, real etcd and gRPC servers, no guest
	$(BIN)/python -m pytest -q -ra tests/unit

integration-test: deps protos images ## tests against whole stacks and real guests
	$(BIN)/python -m pytest -q -ra tests/integration

# The standing suites, not part of `make test` (pytest deselects their markers unless asked): docs/testing.md.
MVM_CHAOS_SECONDS ?= 180
MVM_SOAK_SECONDS ?= 600
CHAOS ?= $(MVM_CHAOS_SECONDS)
SOAK ?= $(MVM_SOAK_SECONDS)

chaos: deps protos ## kill each process of a real stack in turn under load: nothing may be lost (CHAOS=seconds, default 180)
	MVM_CHAOS_SECONDS=$(CHAOS) $(BIN)/python -m pytest -q -ra -s -m chaos --timeout=$$(( $(CHAOS) + 600 )) tests/standing

soak: deps protos ## load a real stack for SOAK seconds (default 600), sample RSS/fds/etcd keys/VM dirs/TAPs: slopes flat
	MVM_SOAK_SECONDS=$(SOAK) $(BIN)/python -m pytest -q -ra -s -m soak --timeout=$$(( $(SOAK) + 600 )) tests/standing

bench: deps protos images
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.breakdown
	$(BIN)/python -m bench.density
	$(BIN)/python -m bench.parallel
	$(BIN)/python -m bench.observability
	$(BIN)/python -m bench.files
	$(BIN)/python -m bench.network
	$(BIN)/python -m bench.cluster
	$(BIN)/python -m bench.hostile
	$(BIN)/python -m bench.clock
	$(BIN)/python -m bench.templates
	$(BIN)/python -m bench.code
	$(BIN)/python -m bench.desktop

clean-state: down
	rm -rf $(MVM_STATE_DIR)
