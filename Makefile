# Two commands for a newcomer on a fresh machine (README "Quick start"):
#   make demo   installs everything, shards the bundled real footage, pretrains demo_cpu, prints the summary
#   make test   installs everything and runs the test suite (CI)
#   make test-fast  the same without the tests marked slow
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	# torch/torchvision pinned first so no other package can pull a different torch build.
	.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps -e .
	.venv/bin/pip check
	touch $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -m 'not slow' tests

demo: $(STAMP)
	DS_ACCELERATOR=cpu bash scripts/demo.sh

clean:
	rm -rf .venv out runs
