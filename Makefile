# Thin aliases: every command lives in noxfile.py.
NOX ?= nox

.PHONY: help test lint tests e2e example demo clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

test: ## Everything CI runs: lint, fast tests, end-to-end tests
	$(NOX) -s lint tests e2e

lint: ## Ruff on the repository and on a rendered project
	$(NOX) -s lint

tests: ## Fast tests of the template
	$(NOX) -s tests

e2e: ## Render, install, train, resume, DDP, gate (minutes)
	$(NOX) -s e2e

example: ## Re-render generated-example/
	$(NOX) -s example

demo: ## Copy the default project into build/demo and run it end to end
	$(NOX) -s demo

clean: ## Remove build outputs and nox environments
	rm -rf build .nox .pytest_cache .ruff_cache
