# xanesdiff: `make demo` sets up and runs the main job; `make test` runs the tests.
ASSETS ?= $(abspath ../shared)
export XANESDIFF_ASSETS ?= $(ASSETS)
export HF_HUB_OFFLINE = 1
export MPLBACKEND = Agg

.PHONY: setup test demo
setup: .venv/.installed
.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

test: setup
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/xanesdiff generate target=examples/target_rho2.5.csv n=2 out=runs/demo
