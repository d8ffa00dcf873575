# Two entry points that do all set-up on a fresh machine:
#   make demo   - compare SINGD, KFAC, AdamW, SGD on six embedded tasks (report in demo_out/)
#   make test   - lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo lint clean

$(STAMP): pyproject.toml
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo 'torchsingd needs python3 >= 3.10 (found: '"$$(python3 --version 2>&1)"')'; exit 1; }
	python3 -m venv $(VENV) || { rm -rf $(VENV); \
	  echo 'python3 -m venv failed: install the venv module (Debian/Ubuntu: apt install python3-venv)'; exit 1; }
	# Pinned first: an unpinned torch would pull a multi-GB CUDA build. The CPU build's
	# wheel is looked for in /opt/wheels where that exists (PIP_FIND_LINKS not needed).
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
	$(PY) -m pip install --quiet -e '.[test,experiments]'
	touch $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m torchsingd.cli compare --out demo_out

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
