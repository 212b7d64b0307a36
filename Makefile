# Thin aliases: every command lives in noxfile.py.
# Python, git and make are all a machine needs: the first target run installs uv and nox into
# a tools environment inside the repository (.tools/, git-ignored) and puts it first on PATH,
# so nox and the sessions' `uv` are those. `make NOX=nox ...` uses a nox already installed.
PYTHON ?= python3
TOOLS ?= .tools
TOOLS_BIN := $(abspath $(TOOLS))/bin
export PATH := $(TOOLS_BIN):$(PATH)
NOX ?= $(TOOLS_BIN)/nox
# Both ranges as .ci/run had them; the tools environment is rebuilt by `make clean`.
TOOL_REQUIREMENTS := "uv>=0.5" "nox>=2025.2.9"

.PHONY: help tools test lint tests e2e example demo clean

help: ## Show the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

tools: $(if $(filter $(TOOLS_BIN)/nox,$(NOX)),$(TOOLS_BIN)/nox) ## Install uv and nox into .tools/ (every target below does it first)

$(TOOLS_BIN)/nox:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS_BIN)/python -m pip install --quiet --disable-pip-version-check $(TOOL_REQUIREMENTS)

test: tools ## Everything CI runs: lint, then every test on parallel workers
	$(NOX) -s lint suite

lint: tools ## Ruff on the repository and on a rendered project
	$(NOX) -s lint

tests: tools ## Fast tests of the template
	$(NOX) -s tests

e2e: tools ## Render, install, train, resume, DDP, gate (minutes)
	$(NOX) -s e2e

example: tools ## Re-render generated-example/
	$(NOX) -s example

demo: tools ## Copy the default project into build/demo and run it end to end
	$(NOX) -s demo

clean: ## Remove build outputs, nox environments and the tools environment
	rm -rf build .nox .pytest_cache .ruff_cache $(TOOLS)
