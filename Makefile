# One set of commands for people and CI. Each target sets up .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint typecheck pre-commit bench chaos clean browser prometheus

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/corral demo

test: $(STAMP) browser prometheus
	$(BIN)/python -m pytest -q

# Headless Chromium for the browser checks (Flower, playground). Installed from Debian when
# possible; without it those tests are skipped and say so.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
	    echo "could not install chromium: browser checks will be skipped"; \
	  else echo "chromium not found: browser checks will be skipped"; fi; }

# promtool and prometheus for the checks of monitoring/prometheus and the dashboard's queries.
# Installed from Debian when possible (its own service stopped: the tests start their own on a
# free port); without them those tests are skipped and say so.
APT_QUIET := DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0
prometheus:
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    if ($(APT_QUIET) install --no-install-recommends prometheus >/dev/null 2>&1 || \
	        ($(APT_QUIET) update >/dev/null 2>&1 && \
	         $(APT_QUIET) install --no-install-recommends prometheus >/dev/null 2>&1)); then \
	      (systemctl disable --now prometheus || service prometheus stop) >/dev/null 2>&1 || true; \
	    else echo "could not install prometheus: its checks will be skipped"; fi; \
	  else echo "promtool not found: the Prometheus checks will be skipped"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The packages checked are listed once, in pyproject.toml ([tool.mypy] files).
typecheck: $(STAMP)
	$(BIN)/mypy

# Every pre-commit hook over the whole tree; the hooks call the tools of .venv.
pre-commit: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pre-commit run --all-files

bench: $(STAMP)
	$(BIN)/python -m benchmarks

chaos: $(STAMP)
	$(BIN)/python -m pytest -q -m chaos -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
