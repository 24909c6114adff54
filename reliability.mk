# Reliability tier (tests/reliability): included by the top-level Makefile.
#
#   make reliability-full   every crash point of clean, restore and resync with type changes;
#                           a second crash at 30 points of each recovery; 500 resyncs under a
#                           churning writer; every fault and concurrency test in copy and
#                           overlay mode. Writes out/reliability.json (see RESULTS.md).
#   make reliability-sampled  the sampled subset the normal suite runs (a few minutes)

.PHONY: reliability-full reliability-sampled

reliability-full: deps venv
	rm -f out/reliability.json
	ASD_RELIABILITY=full ASD_CRASH_POINTS=all $(VENV)/bin/pytest -q -s tests/reliability \
		tests/integration/test_power_cut.py
	@cat out/reliability.json

reliability-sampled: deps venv
	rm -f out/reliability.json
	$(VENV)/bin/pytest -q -s tests/reliability
	@cat out/reliability.json
