# Two commands for a newcomer on a fresh machine (README "Quick start"):
#   make demo   installs everything, shards the bundled real footage, pretrains demo_cpu, prints the summary
#   make test   installs everything and runs the test suite
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	python3 -m venv .venv
	# torch/torchvision pinned first so no other package can pull a different torch build.
	.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip check
	touch $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

demo: $(STAMP)
	DS_ACCELERATOR=cpu bash scripts/demo.sh

clean:
	rm -rf .venv out runs
