# Fresh-machine entry points: `make demo` and `make test` (README, first section).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# No network here: keep Prefect's ephemeral server from phoning home.
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) flows/detect.py run --t1 data/sample/oscd_bercy/imgs_1 --t2 data/sample/oscd_bercy/imgs_2 --out outputs/demo --overwrite
	$(VENV)/bin/changedet evaluate --pred outputs/demo/change_mask.tif --label data/sample/oscd_bercy/cm/bercy-cm.tif
	@echo "report: outputs/demo/report.html"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=30

clean:
	rm -rf $(VENV) outputs .pytest_cache
